"""SIGTERM, what a scheduler (SLURM, Kubernetes) sends before SIGKILL: the run finishes its step, saves it when
``run.stop_grace_seconds`` leaves time, exits with 143 and one line naming the checkpoint to ``--resume`` from;
under DeepSpeed every rank stops at the same step. Through the real command line, as a scheduler would send it."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, ppo_command, subprocess_env, training_rows
from test_hostile import SMALL, assert_one_line, ppo

from llmrl.distributed.checkpoint import COMPLETE_MARK, load_state_file, step_dir_name
from llmrl.distributed.strategy import SingleProcess

LONG = ["train.total_steps=200", "run.save_every=1000"]  # no checkpoint before the end: only SIGTERM writes one


# ------------------------------------------------------------------------------------------
# the pieces, in-process


class OtherRanks(SingleProcess):
    """One rank of a run whose other ranks contribute ``others`` (one value per flag) to every all-reduce."""

    def __init__(self, *others: float):
        super().__init__("cpu")
        self.others = torch.tensor(others, dtype=torch.float64)

    def all_reduce_sum(self, x):
        return x.double() + self.others


@pytest.mark.parametrize("received_ago,grace,save_seconds,others,expected", [
    (None, 30.0, 0.0, (0, 0), (False, False)),  # no signal anywhere: train on
    (1.0, 30.0, 2.0, (0, 0), (True, True)),  # signalled 1 s ago, a save takes 2 s: it fits in 30 s
    (None, 30.0, 0.0, (1, 0), (True, True)),  # only another rank was signalled: this one stops (and saves) too
    (1.0, 30.0, 0.0, (1, 1), (True, False)),  # another rank's grace is spent: no rank saves (the save is collective)
    (29.0, 30.0, 2.0, (0, 0), (True, False)),  # 29 s + a 2 s save would pass 30 s: stop without saving
    (0.0, 0.0, 0.0, (0, 0), (True, False)),  # grace 0: stop, never save
])
def test_ranks_agree_on_stopping_and_saving(received_ago, grace, save_seconds, others, expected):
    from llmrl.trainers.base import agree_to_stop

    now = 1000.0
    received_at = None if received_ago is None else now - received_ago
    assert agree_to_stop(OtherRanks(*others), received_at, grace, save_seconds, now) == expected


def test_sigterm_is_recorded_in_the_main_thread_only_and_the_old_handler_comes_back():
    from llmrl.trainers.base import sigterm_recorded

    def previous(signum, frame):
        raise AssertionError("the previous handler ran inside the block")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with sigterm_recorded() as received:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert len(received) == 1 and received[0] <= time.monotonic()
        assert signal.getsignal(signal.SIGTERM) is previous

        seen = {}

        def in_a_thread():  # signal.signal raises ValueError outside the main thread: nothing is installed
            with sigterm_recorded() as received_there:
                seen["handler"], seen["received"] = signal.getsignal(signal.SIGTERM), received_there

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        assert seen == {"handler": previous, "received": []}
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_negative_grace_is_refused(tiny_model_dir, tmp_path):
    from helpers import tiny_config

    from llmrl.config import ConfigError

    with pytest.raises(ConfigError, match=r"run.stop_grace_seconds is -1.0: must be >= 0"):
        tiny_config(tiny_model_dir, tmp_path / "run", "run.stop_grace_seconds=-1")


# ------------------------------------------------------------------------------------------
# through the command line


def wait_for_steps(proc, run: Path, steps: int, timeout: float = 300) -> None:
    """Until log.jsonl holds ``steps`` training rows (the run is then past them); fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it was signalled"
        if (run / "log.jsonl").is_file() and len(training_rows(run)) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {steps} training steps logged within {timeout} s")


def finish(proc, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the run did not stop within {timeout} s of SIGTERM: {stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start(command) -> subprocess.Popen:
    # a session of its own: the test can signal the whole process group, as a scheduler does
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=subprocess_env(), start_new_session=True)


def stopped_step(line: str) -> int:
    assert line.startswith("error: terminated (SIGTERM) at step "), line
    return int(line.split(" at step ")[1].split(":")[0])


def assert_complete(checkpoint: Path, step: int, ranks: int = 1) -> None:
    """A checkpoint the run wrote whole: its trainer state (written last) says ``step``, every part is there."""
    assert load_state_file(checkpoint / COMPLETE_MARK)["step"] == step
    for part in ("adapter/adapter_model.safetensors", "value_head.safetensors", "config.yaml",
                 *(f"rng_rank{r}.pt" for r in range(ranks))):
        assert (checkpoint / part).is_file(), part
    assert not list(checkpoint.parent.glob(".tmp-*"))


@pytest.mark.slow
def test_sigterm_saves_the_finished_step_names_it_and_exits_143(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(ppo_command([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}", *LONG],
                             ranks=0))
    wait_for_steps(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    last = assert_one_line(out, "terminated (SIGTERM) at step", "saved checkpoint", "pass --resume to continue",
                           code=143)
    step = stopped_step(last)
    assert step >= 2
    checkpoint = run / step_dir_name(step)
    assert str(checkpoint) in last
    assert sorted(run.glob("step-*")) == [checkpoint]  # save_every never came: this is SIGTERM's
    assert_complete(checkpoint, step)
    assert [r["step"] for r in training_rows(run)] == list(range(1, step + 1))

    resumed = ppo(tiny_model_dir, run, "run.save_every=1000", f"train.total_steps={step + 1}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in resumed.stdout
    assert [r["step"] for r in training_rows(run)] == list(range(1, step + 2))
    assert (run / "final" / COMPLETE_MARK).is_file()


@pytest.mark.slow
def test_sigterm_with_no_grace_stops_without_saving_and_names_the_last_checkpoint(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(ppo_command([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}", *LONG,
                              "run.stop_grace_seconds=0"], ranks=0))
    wait_for_steps(proc, run, 1)
    os.killpg(proc.pid, signal.SIGTERM)
    out = finish(proc)
    last = assert_one_line(out, "terminated (SIGTERM) at step",
                           "no checkpoint was saved (run.stop_grace_seconds is 0); the last checkpoint is none yet; "
                           "start again", code=143)
    assert stopped_step(last) >= 1
    assert not list(run.glob("step-*")) and not list(run.glob(".tmp-*")) and not (run / "final").exists()


@pytest.mark.slow
def test_sigterm_to_two_deepspeed_ranks_stops_both_at_one_step_with_one_checkpoint(tiny_model_dir, tmp_path):
    import deepspeed  # noqa: F401  (installed by the README's test command: a missing one fails)

    run = tmp_path / "run"
    args = [*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}", "train.micro_batch_size=2",
            "deepspeed.zero_stage=2"]

    def launch(*extra):
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port())]
        return [*head, *ppo_command([*args, *extra], ranks=0)[1:]]

    proc = start(launch(*LONG))
    wait_for_steps(proc, run, 2, timeout=600)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher, its per-node launcher and both ranks, as a scheduler does
    out = finish(proc)
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    # one message per rank, and nothing else went wrong; the two ranks share one stderr, so their lines may run
    # together (CI once read "...continue from iterror: terminated ..."): split on the message's own start
    lines = ["error: " + message.split("\n")[0] for message in out.stderr.split("error: ")[1:]]
    assert len(lines) == 2, out.stderr[-3000:]
    steps = {stopped_step(line) for line in lines}
    assert len(steps) == 1, lines  # both ranks stopped at the same step boundary
    step = steps.pop()
    checkpoint = run / step_dir_name(step)
    assert all(f"saved checkpoint {checkpoint}; pass --resume to continue" in line for line in lines), lines
    assert sorted(run.glob("step-*")) == [checkpoint]
    assert_complete(checkpoint, step, ranks=2)
    assert (checkpoint / "deepspeed").is_dir()

    resumed = subprocess.run(launch("run.save_every=1000", f"train.total_steps={step + 1}", "--resume"),
                             capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in resumed.stdout
    assert [r["step"] for r in training_rows(run)] == list(range(1, step + 2))
