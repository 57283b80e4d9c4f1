"""Model-written code in the python_tool sandbox, as a hostile model would write it (the hardening audit of
2026-12-03, each case a test): it cannot stop or kill the trainer, read its environment, the user's files or
/etc, write outside its private folder or past its size, leave processes behind, reach the network, or take the
trainer's memory by printing. Cases that could harm the test process run the tool in a child process."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from helpers import REPO, ppo_command, subprocess_env

from llmrl.config import ConfigError
from llmrl.envs import make_env
from llmrl.envs import sandbox
from llmrl.envs.sandbox import Limits, SandboxError, run_python

CHILD = """
import json, os, resource, sys, time
from llmrl.envs import make_env
env = make_env("python_tool", {"digits": 2, "wall_seconds": float(sys.argv[2])})
env.reset(seed=0)
code = sys.argv[1].replace("PID", str(os.getpid())).replace("PPID", str(os.getppid()))
before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
obs, reward, terminated, truncated, info = env.step("python: " + code)
print(json.dumps({"obs": obs, "reason": info.get("reason"), "seconds": time.monotonic() - started,
                  "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def tool_in_child(code: str, wall_seconds: float = 5.0, **env) -> tuple[subprocess.CompletedProcess, dict]:
    """The python_tool's answer to ``python: CODE`` in a child process that stands for the trainer (PID in the code
    is that process's pid, PPID its parent's); its exit status shows whether the code could reach it."""
    out = subprocess.run([sys.executable, "-c", CHILD, code, str(wall_seconds)], capture_output=True, text=True,
                         timeout=120, env={**subprocess_env(), **env}, start_new_session=True)  # its own group
    lines = out.stdout.strip().splitlines()
    return out, json.loads(lines[-1]) if out.returncode == 0 and lines else {}


def test_the_sandbox_is_available_here():
    # CI installs bubblewrap (.ci/run); without it every other test here would test the refusal only
    assert sandbox.isolation_problem() is None, sandbox.isolation_problem()
    assert sandbox.describe().startswith("bubblewrap:")


@pytest.mark.parametrize("code", ["import os; os.kill(os.getppid(), 9); print('sent')",
                                  "import os; os.kill(PID, 9); print('sent')",
                                  "import os; os.kill(PID, 19); print('sent')",
                                  "import os, signal; os.killpg(os.getpgid(PID), 9); print('sent')"])
def test_the_code_cannot_kill_or_stop_the_trainer(code):
    out, result = tool_in_child(code)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])  # the trainer lived to report
    assert "sent" not in result["obs"] or "os.getppid" in code, result  # PID is not in its pid namespace
    # os.getppid() is the sandbox's own init: the signal is ignored, the trainer never sees it


def test_the_code_cannot_read_the_trainers_environment_or_the_users_files(tmp_path):
    secret = uuid.uuid4().hex
    (tmp_path / "private.txt").write_text(secret)
    for code in ["print(open('/proc/PID/environ', 'rb').read())", "print(open('/proc/PPID/environ', 'rb').read())",
                 "import os; print([open(f'/proc/{p}/environ','rb').read() for p in os.listdir('/proc') "
                 "if p.isdigit()])",
                 f"print(open({str(tmp_path / 'private.txt')!r}).read())"]:
        out, result = tool_in_child(code, LLMRL_TEST_SECRET=secret)
        assert out.returncode == 0, out.stderr[-2000:]
        assert secret not in result["obs"], (code, result)
    for code in ["print(open('/etc/passwd').read())", f"import os; print(os.listdir({str(os.path.expanduser('~'))!r}))",
                 f"import os; print(os.listdir({str(REPO)!r}))"]:
        with pytest.raises(SandboxError, match="No such file or directory"):
            run_python(code)


def test_the_code_writes_only_its_private_folder_and_only_up_to_its_size(tmp_path):
    package = REPO / "llmrl" / "envs" / f"_escaped_{uuid.uuid4().hex[:8]}.py"
    outside = tmp_path / "escaped.txt"
    try:
        for target in (package, outside):
            with pytest.raises(SandboxError, match="No such file or directory|Read-only file system"):
                run_python(f"open({str(target)!r}, 'w').write('x')")
            assert not target.exists()
    finally:  # on the old code the write went through: do not leave it in the source tree
        package.unlink(missing_ok=True)
    # RLIMIT_FSIZE caps one file at 1 MB; the folder's total is capped too (disk_mb)
    code = ("n = 0\nfor i in range(150):\n    open(f'f{i}', 'wb').write(b'x' * (2**20 - 1))\n    n += 1\n"
            "print(n)")
    with pytest.raises(SandboxError, match="No space left on device"):
        run_python(code, Limits(disk_mb=8))
    assert run_python(code.replace("150", "4"), Limits(disk_mb=8)) == "4\n"  # under the cap it writes


def survivors(token: str) -> list[int]:
    """Processes on this machine whose command line holds ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_nothing_the_code_started_outlives_it():
    token = uuid.uuid4().hex
    detached = (f"import os, time  # {token}\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                f"        time.sleep(30)\n    os._exit(0)\nprint('left one behind')")
    sleepers = (f"import os, time  # {token}\nfor i in range(8):\n    if os.fork() == 0:\n        time.sleep(30)\n"
                f"        os._exit(0)\nprint('left eight behind')")
    for code in (detached, sleepers):
        assert run_python(code).startswith("left")
        time.sleep(0.3)
        alive = survivors(token)
        for pid in alive:  # the old sandbox left them: clean up before failing
            os.kill(pid, 9)
        assert alive == [], code


def test_the_code_cannot_start_more_processes_than_its_cap():
    code = ("import os, time\nn = 0\nfor i in range(60):\n    if os.fork() == 0:\n        time.sleep(5)\n"
            "        os._exit(0)\n    n += 1\nprint(n)")
    assert sandbox.plan().uid is not None or os.geteuid() != 0  # here: root drops to nobody, so the cap holds
    with pytest.raises(SandboxError, match="Resource temporarily unavailable"):
        run_python(code, Limits(max_processes=8))


def test_the_code_has_no_network_even_when_it_reimports_socket():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    code = ("import sys; sys.modules.pop('socket', None); sys.modules.pop('_socket', None); import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')")
    try:
        with pytest.raises(SandboxError, match="Connection refused|Network is unreachable"):
            run_python(code)
        assert not accepted
    finally:
        server.close()


def test_printing_a_gigabyte_keeps_the_trainers_memory_and_time_bounded():
    code = "import sys; [sys.stdout.write('x' * 2**20) for _ in range(1024)]"
    out, result = tool_in_child(code, wall_seconds=5.0)
    assert out.returncode == 0, out.stderr[-2000:]
    assert result["reason"].startswith("tool error: printed more than"), result
    assert result["rss_growth_mb"] < 64, result  # the old reader buffered all of it: +2.9 GB
    assert result["seconds"] < 5.0, result
    out, result = tool_in_child("import time; [print('x', flush=True) or time.sleep(0.01) for _ in range(10**6)]",
                                wall_seconds=1.0)
    assert result["reason"] == "tool error: timed out after 1 s of wall time", result  # enforced while reading
    assert result["seconds"] < 3.0, result


def test_the_code_runs_as_a_user_that_owns_nothing_and_sees_only_its_processes():
    uid, pids, names = run_python("import os; print(os.getuid(), len([p for p in os.listdir('/proc') if p.isdigit()]),"
                                  " sorted(os.listdir('/')))").split(" ", 2)
    assert uid == "65534"
    assert int(pids) <= 2  # the namespace's init and the code itself
    for name in ("home", "root", "etc", "work"):
        assert f"'{name}'" not in names, names


def test_without_bubblewrap_python_tool_refuses_to_start_unless_told_unisolated(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    sandbox.isolation_problem.cache_clear()
    try:
        with pytest.raises(ConfigError, match="bubblewrap.*apt-get install bubblewrap.*unsafe_no_isolation: true"):
            make_env("python_tool", {"digits": 2})
        env = make_env("python_tool", {"digits": 2, "unsafe_no_isolation": True})
        env.reset(seed=0)
        assert env.step("python: print(6 * 7)")[0] == "= 42"
        assert env.step("python: print('x' * 10**6)")[4]["reason"].startswith("tool error: printed more than")
    finally:
        sandbox.isolation_problem.cache_clear()


def test_without_bubblewrap_the_command_line_says_what_to_install(tmp_path):
    command = ppo_command(["env.name=python_tool", "env.kwargs={digits: 2}", "warm_start=null",
                           f"run.output_dir={tmp_path / 'run'}"], config=REPO / "configs" / "guess_number.yaml")
    out = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**subprocess_env(), "PATH": str(tmp_path)})
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: env python_tool runs model-written code in a bubblewrap sandbox"), last
    assert "unsafe_no_isolation" in last
    assert not (tmp_path / "run").exists()  # refused before anything was written
