"""Running a model's Python in a subprocess with limits: CPU seconds, address space, wall clock, output size, and
no network.

The child is a fresh interpreter (``python -I``: no user site, no environment variables, no current folder on the
path) in an empty temporary folder, in its own session so that a timeout kills everything it started. Limits are
set in the child before it runs the code: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC`` where
the system allows. The network is removed with a new network namespace (``unshare(CLONE_NEWNET)``) when the
kernel lets this process make one; otherwise the ``socket`` modules are made unimportable in the child, which
stops ordinary code but not code that goes around them through ``ctypes`` (``network_isolated`` says which was
used). This bounds what a policy's output can do to the machine; it is not a security boundary against a
determined attacker: run untrusted models in a container as well.
"""
from __future__ import annotations

import ctypes
import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000

# Run in the child before the code: no socket modules, whatever the namespace did.
PREAMBLE = "import sys\nsys.modules['socket'] = None\nsys.modules['_socket'] = None\ndel sys\n"


class SandboxError(RuntimeError):
    """The code failed, ran out of time or memory, or printed too much; the message says which."""


@dataclass
class Limits:
    cpu_seconds: int = 2
    memory_mb: int = 256
    wall_seconds: float = 5.0
    max_output: int = 2000  # characters of stdout kept; more is an error


@functools.cache
def can_unshare_network() -> bool:
    """Whether a child may drop into its own network namespace (tried once, in a throwaway child)."""
    if sys.platform != "linux":
        return False
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.unshare(CLONE_NEWNET) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def network_isolated() -> str:
    return "network namespace" if can_unshare_network() else "socket modules removed"


def _limit_child(limits: Limits, namespace: bool):
    def apply() -> None:
        if namespace:
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
        memory = limits.memory_mb * 2**20
        for which, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, memory),
                             (resource.RLIMIT_FSIZE, 2**20)):
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):  # a hard limit already below ours
                pass
    return apply


def run_python(code: str, limits: Limits | None = None) -> str:
    """The standard output of ``code`` run as a script under ``limits``; a SandboxError says why it failed."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="llmrl-sandbox-") as folder:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", PREAMBLE + code], cwd=folder, env={},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=_limit_child(limits, can_unshare_network()), start_new_session=True)
        except OSError as e:
            raise SandboxError(f"could not start the sandbox: {e}") from None
        try:
            out, err = proc.communicate(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise SandboxError(f"timed out after {limits.wall_seconds:g} s of wall time") from None
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = "CPU time limit" if sig in ("SIGXCPU", "SIGKILL") else sig
        raise SandboxError(f"killed by {sig} ({why}, {limits.cpu_seconds} s of CPU)")
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise SandboxError(lines[-1][:200] if lines else f"exit status {proc.returncode}")
    if len(text) > limits.max_output:
        raise SandboxError(f"printed {len(text)} characters, more than {limits.max_output}")
    return text
