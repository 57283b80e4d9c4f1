"""Building a trainer on a tiny model in-process, for tests that need the real pieces together, and running
``launch/ppo.py`` in a subprocess, in one process or on CPU ranks under the deepspeed launcher."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from llmrl.config import load_config

REPO = Path(__file__).resolve().parent.parent


def tiny_config(model_dir, run_dir, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}", "run.progress=false",
        "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=2", "train.epochs=2",
        "data.eval_size=8", "run.device=cpu", *overrides,
    ])


def make_trainer(cfg, strategy=None):
    from llmrl.distributed.strategy import SingleProcess
    from llmrl.trainers.online import build_trainer

    return build_trainer(cfg, strategy or SingleProcess("cpu"))


# Greedy rollouts make the samples independent of how the batch is split over ranks; one minibatch per
# rollout and one PPO epoch make the update one full-batch gradient step: so such runs must agree.
EQUAL = ["generation.do_sample=false", "train.total_steps=3", "train.rollout_batch_size=16", "train.mini_batch_size=16",
         "train.epochs=1", "run.eval_every=0", "run.progress=false", "data.eval_size=16", "run.threads=1"]
MASTER_PORT = 29500 + os.getpid() % 1000  # launch_ppo's: fixed for the test process, apart from other processes'


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher of its own (pytest-xdist runs test files side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """This environment, offline, with llmrl importable (also from a side environment, as the vllm tests')."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}


def ppo_command(args, ranks=0, config=REPO / "configs" / "tiny.yaml") -> list[str]:
    """``launch/ppo.py --config CONFIG ARGS`` with this interpreter: plain python for ranks=0, else under the
    deepspeed launcher with ``ranks`` CPU ranks (gloo)."""
    head = [sys.executable] if ranks == 0 else \
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(MASTER_PORT)]
    return [*head, str(REPO / "launch" / "ppo.py"), "--config", str(config), *map(str, args)]


def launch_ppo(args, ranks=2, config=REPO / "configs" / "tiny.yaml", timeout=600) -> subprocess.CompletedProcess:
    """Runs ``ppo_command(args, ranks, config)`` offline to completion, output captured."""
    return subprocess.run(ppo_command(args, ranks, config), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=subprocess_env())


def kill_9_after_checkpoint(command: list[str], run_dir, step: int, timeout: float = 300) -> None:
    """Start the training ``command`` (writing ``run_dir``), send it SIGKILL once a complete checkpoint of ``step`` or
    later is there, and check that the run had not finished by then."""
    import signal
    import time

    from llmrl.distributed.checkpoint import step_checkpoints

    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not any(s >= step for s, _ in step_checkpoints(run_dir)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(run_dir) / "final").exists(), "the run finished before it could be killed"


def training_rows(run_dir) -> list[dict]:
    """The training steps' rows of a run's log.jsonl (not evaluations or sample tables)."""
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()
            if "reward/mean" in line]


def assert_one_line(out, *fragments, code=2) -> str:
    """A command ended with exit ``code`` and one line ``error: ...`` holding each fragment, no traceback; returns it."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


class ThreadRanks:
    """Data-parallel ranks simulated by threads of this process: ``strategy(r)`` is rank r's SingleProcess whose
    ``all_reduce_sum`` sums what every rank passes at the same call, as torch.distributed's does; ``run`` calls a
    function on each rank's thread and returns the results in rank order. For the maths of reductions over ranks
    (divisors, whitening) in seconds; real multi-process runs are tests/test_deepspeed.py's."""

    def __init__(self, world_size: int = 2):
        import threading

        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=120)
        self.slots: list = [None] * world_size

    def all_reduce_sum(self, rank: int, x):
        self.slots[rank] = x.detach().clone()
        self.barrier.wait()  # every rank has written its share
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()  # every rank has read, before any writes the next call's
        return total.to(x.device)

    def strategy(self, rank: int):
        from llmrl.distributed.strategy import SingleProcess

        ranks = self

        class Rank(SingleProcess):
            world_size = ranks.world_size

            def all_reduce_sum(self, x):
                return ranks.all_reduce_sum(self.rank, x)

        strategy = Rank("cpu")
        strategy.rank, strategy.is_main = rank, rank == 0
        return strategy

    def run(self, fn) -> list:
        """``fn(rank)`` on one thread per rank; the first exception any rank raised is raised here."""
        import threading

        results, errors = [None] * self.world_size, []

        def target(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(e)
                self.barrier.abort()  # the other ranks stop waiting

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results
