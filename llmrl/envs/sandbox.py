"""Running a model's Python in an isolated sandbox (bubblewrap), with CPU, memory, disk, process, wall-clock and
output limits.

What the code sees and may do, by default (``run_python``):

- **Its own namespaces** (bubblewrap ``--unshare-all``): pid, mount, network, user, IPC, UTS and cgroup. In its own
  pid namespace it sees and can signal only the processes it started (the trainer is not there), and everything
  it started dies when the sandbox ends (the namespace's init is killed, so forked or ``setsid`` grandchildren
  cannot outlive the call). Its network namespace has no interface but a loopback of its own: nothing on this
  machine or beyond is reachable.
- **Files**: a read-only ``/usr`` (and the ``/bin``, ``/lib`` links into it), the Python installation it runs on,
  read-only, a private ``/proc`` and a minimal ``/dev``, and one writable folder, ``/tmp`` (its working folder), a
  tmpfs whose total size is ``Limits.disk_mb``. Everything else (home folders, ``/etc``, the project, the
  trainer's environment variables) is absent; the root is read-only.
- **Its own uid**: run as root (as in a container), the sandbox drops to ``nobody`` (65534), a user that owns no
  file, so ``RLIMIT_NPROC`` caps the processes it starts at ``Limits.max_processes`` (on top of what ``nobody``
  already runs, e.g. other sandboxes). Root's
  interpreter is often in a folder ``nobody`` cannot read (pyenv under ``/root``): the system's ``/usr/bin/python3``
  runs the code then. Run as another user, the code runs as uid 65534 inside a user namespace that maps to that
  user, with ``RLIMIT_NPROC`` at that user's processes plus ``Limits.max_processes``.
- **Limits** set before it starts: ``RLIMIT_CPU`` (per process), ``RLIMIT_AS`` (per process), ``RLIMIT_FSIZE``
  (one file), ``RLIMIT_NPROC``. The wall clock is enforced while its output is read; standard output is read up
  to ``Limits.max_output`` characters and the sandbox is killed past that, so the trainer's memory stays bounded
  whatever the code prints.

The interpreter is started with ``-I -S``: the standard library only, no site-packages, no environment.

Where bubblewrap is missing or the kernel refuses it unprivileged user namespaces, ``isolation_problem()`` says why
and the ``python_tool`` environment refuses to start, unless its ``unsafe_no_isolation`` setting is true: then the
code runs in a plain subprocess with the same rlimits, capped output and the socket modules removed, which stops
mistakes, not an adversary (it can read the user's files and signal the trainer).
"""
from __future__ import annotations

import functools
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

# Run in an unisolated child before the code: no socket modules (code can go around this: see the docstring).
PREAMBLE = "import sys\nsys.modules['socket'] = None\nsys.modules['_socket'] = None\ndel sys\n"

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) and "
                "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 or "
                "user.max_user_namespaces > 0)")


class SandboxError(RuntimeError):
    """The code failed, ran out of time or memory, or printed too much; the message says which."""


@dataclass
class Limits:
    cpu_seconds: int = 2
    memory_mb: int = 256  # address space of each process
    wall_seconds: float = 5.0
    max_output: int = 2000  # characters of stdout kept; more is an error
    disk_mb: int = 16  # total size of the writable folder (isolated mode)
    max_processes: int = 16  # processes the code may have at once, itself included


@functools.cache
def isolation_problem() -> str | None:
    """Why code cannot be isolated here (None when it can): bubblewrap is tried once, on ``true``."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not on PATH"
    try:
        probe = subprocess.run([bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap could not run ({e})"
    if probe.returncode != 0:
        said = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"bubblewrap could not make a sandbox ({said[-1] if said else f'exit status {probe.returncode}'})"
    return None


def _world_readable(path: Path) -> bool:
    """Whether a user who owns nothing could execute ``path``: every folder above it searchable by others."""
    try:
        if not path.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)
    except OSError:
        return False


@dataclass(frozen=True)
class Plan:
    """How the sandbox runs: which interpreter, its installation folder (bound read-only) and under which uid."""

    python: str
    prefix: str
    uid: int | None  # the real uid to switch to before bubblewrap starts; None keeps this process's


@functools.cache
def plan() -> Plan:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own = Path(sys.base_prefix) / "bin" / version  # the base interpreter, not a virtual environment's link
    python = str(own) if own.exists() else os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return Plan(python, sys.base_prefix, None)
    if _world_readable(Path(python)):
        return Plan(python, sys.base_prefix, NOBODY)
    system = Path("/usr/bin/python3")
    if system.exists() and _world_readable(system.resolve()):
        return Plan(str(system.resolve()), "/usr", NOBODY)
    return Plan(python, sys.base_prefix, None)  # root's interpreter, namespaces only


def describe() -> str:
    """One line for logs and the README's claim: what isolates the code here."""
    problem = isolation_problem()
    if problem:
        return f"not isolated: {problem}"
    p = plan()
    who = "as nobody (uid 65534)" if p.uid == NOBODY else "as uid 65534 in a user namespace"
    return f"bubblewrap: own pid, mount, network and user namespaces, {who}, Python {p.python}"


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _bwrap_command(code: str, limits: Limits, p: Plan) -> list[str]:
    command = [shutil.which("bwrap"), "--unshare-all", "--die-with-parent", "--new-session",
               "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64"):  # merged-/usr links, or the real folders where not merged
        path = Path("/") / top
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    if not p.prefix.startswith("/usr/") and p.prefix != "/usr":
        command += ["--ro-bind", p.prefix, p.prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.disk_mb * 2**20), "--tmpfs", "/tmp",
                "--chdir", "/tmp", "--remount-ro", "/", p.python, "-I", "-S", "-c", code]
    return command


def _limit_child(limits: Limits, uid: int | None, nproc: int):
    """Runs in the child between fork and exec: rlimits, then (as root) the switch to ``uid``."""
    def apply() -> None:
        memory = limits.memory_mb * 2**20
        for which, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, memory),
                             (resource.RLIMIT_FSIZE, 2**20), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):  # a hard limit already below ours
                pass
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return apply


def _read(proc: subprocess.Popen, limits: Limits) -> tuple[bytes, bytes]:
    """Standard output (at most ``max_output`` characters' worth) and the tail of standard error, read while the
    wall clock runs; a SandboxError, with the sandbox killed, when either limit is passed."""
    deadline = time.monotonic() + limits.wall_seconds
    cap = 4 * limits.max_output + 4  # bytes: a character is at most 4 in UTF-8
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(proc)
                raise SandboxError(f"timed out after {limits.wall_seconds:g} s of wall time")
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if key.data is out and len(out) > cap:
                    _kill(proc)
                    raise SandboxError(f"printed more than {limits.max_output} characters")
                del err[:-4096]  # only the end of a traceback is shown
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise SandboxError(f"timed out after {limits.wall_seconds:g} s of wall time") from None
    return bytes(out), bytes(err)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the sandbox's process group; bubblewrap's --die-with-parent then takes its pid namespace down."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_python(code: str, limits: Limits | None = None, isolated: bool = True) -> str:
    """The standard output of ``code`` run as a script under ``limits``; a SandboxError says why it failed.

    ``isolated=False`` runs it without bubblewrap (rlimits and capped output only): only for trusted code or a
    machine where isolation cannot be had and the user said so (``unsafe_no_isolation``)."""
    limits = limits or Limits()
    if isolated:
        problem = isolation_problem()
        if problem:
            raise SandboxError(f"cannot isolate the code: {problem}; {INSTALL_HINT}")
        p = plan()
        command, cwd, uid = _bwrap_command(code, limits, p), None, p.uid
    else:
        folder = tempfile.TemporaryDirectory(prefix="llmrl-sandbox-")
        command, cwd, uid = [sys.executable, "-I", "-c", PREAMBLE + code], folder.name, None
    # RLIMIT_NPROC counts every process of the uid (other sandboxes running at the same time too)
    nproc = limits.max_processes + 2 + _processes_of(os.geteuid() if uid is None else uid)  # + bubblewrap's two
    try:
        try:
            proc = subprocess.Popen(command, cwd=cwd, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, preexec_fn=_limit_child(limits, uid, nproc),
                                    start_new_session=True)
        except OSError as e:
            raise SandboxError(f"could not start the sandbox: {e}") from None
        with proc:
            out, err = _read(proc, limits)
            if not isolated:  # no pid namespace: what the code left running is killed with its session
                _kill(proc)
    finally:
        if not isolated:
            folder.cleanup()
    code_ = proc.returncode
    # bubblewrap reports a child killed by signal N as exit status 128 + N
    sig = -code_ if code_ < 0 else code_ - 128 if isolated and 128 < code_ < 160 else None
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        why = "CPU time limit" if name in ("SIGXCPU", "SIGKILL") else name
        raise SandboxError(f"killed by {name} ({why}, {limits.cpu_seconds} s of CPU)")
    text = out.decode("utf-8", "replace")
    if code_ != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise SandboxError(lines[-1][:200] if lines else f"exit status {code_}")
    if len(text) > limits.max_output:
        raise SandboxError(f"printed more than {limits.max_output} characters")
    return text
