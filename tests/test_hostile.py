"""Bad input through the real command line, as a hostile user would give it: every case must end in one line
on stderr ("error: ..." naming the value and the fix), no traceback, the documented exit code (2; 130 for
Ctrl-C), and the checkpoints already on disk byte for byte as they were. Nothing in a checkpoint runs."""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, launch_ppo, ppo_command, subprocess_env

pytestmark = pytest.mark.slow

SMALL = ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=4",
         "train.epochs=1", "data.eval_size=8", "run.eval_every=0", "run.device=cpu", "run.threads=1",
         "run.save_every=1", "run.keep_last=10"]


def digest(run: Path) -> dict:
    """Every file of the run's checkpoints (step-N/, final/) -> its sha256."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0].startswith(("step-", "final"))}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2 (and final), copied fresh for each test."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    out = launch_ppo([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}", "train.total_steps=2"],
                     ranks=0)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


@pytest.fixture
def run_copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def ppo(tiny_model_dir, run, *args, **kwargs):
    return launch_ppo([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}", *args], ranks=0,
                      **kwargs)


def assert_one_line(out, *fragments, code=2):
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") or code == 130, last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


@pytest.mark.parametrize("args,fragments", [
    (["ppo.kl_horizon=0"], ["ppo.kl_horizon is 0.0: must be > 0"]),
    (["run.device=tpu"], ["run.device is 'tpu': use auto, cpu, cuda"]),
    (["reward.function=:"], ["override 'reward.function=:': the value is not valid YAML"]),
    (["data.source=[abc"], ["override 'data.source=[abc': the value is not valid YAML"]),
    (["ppo.vf_coef=.nan"], ["ppo.vf_coef is nan: must be a finite number"]),
    (["ppo.kl_target=.nan"], ["ppo.kl_target is nan: must be a finite number"]),
    (["reward.clip=-1"], ["reward.clip is -1.0: must be > 0"]),
    (["reward.clip=0"], ["reward.clip is 0.0: must be > 0"]),
    (["data.task.max_len=100"], ["data.task.max_len is 100", "under 10^7"]),
    (["generation.max_new_tokens=1000000000"], ["generation.max_new_tokens = 1000000000 leaves no room for a prompt "
                                                "in the model's context of 32 tokens"]),
])
def test_bad_settings_are_one_line_before_anything_runs(tiny_model_dir, tmp_path, args, fragments):
    started = time.monotonic()
    out = ppo(tiny_model_dir, tmp_path / "run", *args, timeout=120)
    assert_one_line(out, *fragments)
    assert time.monotonic() - started < 90  # data.task.max_len=100 enumerated 6^100 strings: it hung
    assert not list((tmp_path / "run").glob("step-*"))


def test_bad_data_files_are_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9>", "answer": "x"}\n' * 20)
    out = ppo(tiny_model_dir, tmp_path / "run", f"data.source={tmp_path / 'latin1.jsonl'}")
    assert_one_line(out, "is not UTF-8 text (byte 0xe9 on line 1): save it as UTF-8")
    (tmp_path / "empty_prompts.jsonl").write_text("".join(json.dumps({"prompt": "", "answer": "x"}) + "\n"
                                                          for _ in range(20)))
    out = ppo(tiny_model_dir, tmp_path / "run", f"data.source={tmp_path / 'empty_prompts.jsonl'}")
    assert_one_line(out, "data.source: prompt 0 is empty")


def test_bad_reward_model_folders_are_one_line(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty_rm"
    empty.mkdir()
    broken = tmp_path / "broken_rm"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for folder, fragment in ((empty, "is a folder without config.json"),
                             (broken, "could be loaded from it"),
                             ("runs/no-such-reward-model", "no tokenizer could be loaded from it")):
        out = ppo(tiny_model_dir, tmp_path / "run", "reward.function=", f"reward.components=[{{model: {folder}}}]")
        assert_one_line(out, fragment)


def test_a_tampered_checkpoint_runs_nothing(tiny_model_dir, run_copy, tmp_path):
    """trainer_state.pt and rng_rank0.pt were read with pickle: this file ran its command on --resume and export."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for name in ("trainer_state.pt", "rng_rank0.pt"):
        victim = run_copy / "step-000002" / name
        original = victim.read_bytes()
        torch.save({"step": 2, "payload": Exploit()}, victim)
        before = digest(run_copy)
        out = ppo(tiny_model_dir, run_copy, "train.total_steps=3", "--resume")
        assert_one_line(out, f"{name} cannot be read as plain state", "move this folder away")
        assert not marker.exists() and digest(run_copy) == before
        if name == "trainer_state.pt":
            exported = subprocess.run([sys.executable, "-m", "llmrl", "export", "--checkpoint",
                                       run_copy / "step-000002", "--out", tmp_path / "merged"], capture_output=True,
                                      text=True, cwd=REPO, env=subprocess_env(), timeout=300)
            assert_one_line(exported, "cannot be read as plain state")
            assert not marker.exists() and not (tmp_path / "merged").exists()
        victim.write_bytes(original)


@pytest.mark.parametrize("damage,fragment", [
    ("truncate_adapter", "adapter_model.safetensors is damaged"),
    ("remove_adapter", "adapter_model.safetensors is missing"),
    ("garbage_rng", "rng_rank0.pt cannot be read as plain state"),
    ("garbage_fingerprint", "base_fingerprint.json is damaged"),
])
def test_a_damaged_checkpoint_is_named_on_resume(tiny_model_dir, run_copy, damage, fragment):
    step = run_copy / "step-000002"
    if damage == "truncate_adapter":
        path = step / "adapter" / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "remove_adapter":
        shutil.rmtree(step / "adapter")
    elif damage == "garbage_rng":
        (step / "rng_rank0.pt").write_bytes(b"garbage" * 10)
    else:
        (step / "base_fingerprint.json").write_text("{garbage")
    before = digest(run_copy)
    out = ppo(tiny_model_dir, run_copy, "train.total_steps=3", "--resume")
    assert_one_line(out, fragment)
    assert digest(run_copy) == before


@pytest.mark.parametrize("change,fragment", [
    ("algorithm=grpo", "algorithm 'ppo' -> 'grpo'"),
    ("data.source=task:sort", "data.source 'task:reverse' -> 'task:sort'"),
    ("lora.alpha=64", "lora.alpha 32 -> 64"),
    ("lora.r=8", "lora.r 16 -> 8"),
])
def test_resume_refuses_changed_settings_by_name(tiny_model_dir, run_copy, change, fragment):
    before = digest(run_copy)
    out = ppo(tiny_model_dir, run_copy, "train.total_steps=3", change, "--resume")
    assert_one_line(out, fragment, "differ from the checkpoint's settings", "A resume may change only train.total_steps")
    assert digest(run_copy) == before


def test_resume_applies_a_new_learning_rate(tiny_model_dir, run_copy):
    out = ppo(tiny_model_dir, run_copy, "train.total_steps=3", "train.lr=1e-6", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train.lr 0.001 -> 1e-06" in out.stdout.split("changed: ")[1]  # listed with the moved run folder
    rows = [json.loads(line) for line in (run_copy / "log.jsonl").read_text().splitlines() if "optim/lr" in line]
    assert rows[-1]["step"] == 3 and rows[-1]["optim/lr"] == pytest.approx(1e-6)
    summary = json.loads((run_copy / "summary.json").read_text())
    first = json.loads(next(line for line in (run_copy / "log.jsonl").read_text().splitlines() if "time/step" in line))
    assert summary["wall_seconds"] > first["time/step"]  # it counts the first process's time too


def test_resume_at_the_last_step_keeps_the_summary_whole(tiny_model_dir, run_copy):
    out = ppo(tiny_model_dir, run_copy, "train.total_steps=2", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["train_reward_last"] is not None and summary["kl_last"] is not None


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, run_copy):
    before = digest(run_copy)
    out = ppo(tiny_model_dir, run_copy, "train.total_steps=4", "train.lr=1e8", "run.keep_last=1", "--resume")
    last = assert_one_line(out, "training diverged", "nothing of this step was saved",
                           f"Last good checkpoint: {run_copy / 'step-000002'}", "Lower train.lr")
    assert "step 3:" in last
    assert digest(run_copy) == before  # not pruned, not replaced by a NaN checkpoint
    assert not list(run_copy.glob(".tmp-*"))


def test_a_full_disk_stops_cleanly_and_resume_then_works(tiny_model_dir, run_copy):
    """A file-size limit stands in for a full disk: writes past it fail (EFBIG) as they would on ENOSPC."""
    size = (run_copy / "step-000002" / "trainer_state.pt").stat().st_size

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    before = digest(run_copy)
    out = subprocess.run(ppo_command([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run_copy}",
                                      "train.total_steps=3", "--resume"], ranks=0), capture_output=True, text=True,
                         cwd=REPO, env=subprocess_env(), timeout=300, preexec_fn=limited)
    assert_one_line(out, "could not write checkpoint", "the half-written folder was removed",
                    f"Last good checkpoint: {run_copy / 'step-000002'}")
    assert digest(run_copy) == before and not list(run_copy.glob(".tmp-*"))
    # a half-written last line of log.jsonl (the disk filled mid-line) is repaired, not a JSONDecodeError
    with open(run_copy / "log.jsonl", "a") as f:
        f.write('{"step": 3, "reward/mea')
    from llmrl.distributed.checkpoint import begin_checkpoint

    begin_checkpoint(run_copy / ".tmp-step-000003")  # and a temporary folder a killed run left (marked as
    # llmrl's when it was made) is cleared at start
    resumed = ppo(tiny_model_dir, run_copy, "train.total_steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_copy / ".tmp-step-000003").exists()
    steps = [json.loads(line)["step"] for line in (run_copy / "log.jsonl").read_text().splitlines()]
    assert steps.count(3) >= 1 and all(isinstance(s, int) for s in steps)
    plot = subprocess.run([sys.executable, "-m", "llmrl", "plot", run_copy], capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env(), timeout=120)
    assert plot.returncode == 0, plot.stderr[-2000:]


def test_output_dir_that_is_a_file_or_a_link(tiny_model_dir, tmp_path, run_copy):
    (tmp_path / "a_file").write_text("mine")
    assert_one_line(ppo(tiny_model_dir, tmp_path / "a_file"), "is a file, not a folder")
    link = tmp_path / "link"
    link.symlink_to(run_copy)
    before = digest(run_copy)
    assert_one_line(ppo(tiny_model_dir, link, "--overwrite"), "is a symbolic link")
    assert digest(run_copy) == before and (tmp_path / "a_file").read_text() == "mine"


def test_overwrite_never_deletes_a_file_inside_a_checkpoint(tiny_model_dir, run_copy):
    (run_copy / "final" / "thesis.tex").write_text("two years of work")
    out = ppo(tiny_model_dir, run_copy, "--overwrite")
    assert_one_line(out, "also holds final/thesis.tex, which llmrl did not write there")
    assert (run_copy / "final" / "thesis.tex").read_text() == "two years of work"


def test_a_reward_returning_a_dict_stops_with_one_line(tiny_model_dir, run_copy, tmp_path):
    (tmp_path / "rw.py").write_text("def as_dict(prompts, completions, **kwargs):\n"
                                    "    return {i: 1.0 for i in range(len(completions))}\n")
    before = digest(run_copy)
    out = ppo(tiny_model_dir, run_copy, "train.total_steps=3", f"reward.function={tmp_path / 'rw.py'}:as_dict",
              "--resume")
    # a changed reward is refused on resume; in a new run it fails at the first step with the reward's name
    assert_one_line(out, "reward.function")
    assert digest(run_copy) == before
    fresh = ppo(tiny_model_dir, tmp_path / "fresh", f"reward.function={tmp_path / 'rw.py'}:as_dict")
    assert_one_line(fresh, "reward 'as_dict' returned dict, not a list of floats")


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_exit_130(tiny_model_dir, run_copy):
    proc = subprocess.Popen(ppo_command([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run_copy}",
                                         "train.total_steps=200", "--resume"], ranks=0), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env(),
                            # a test runner started in the background by a script inherits SIGINT ignored, and
                            # Python then never raises KeyboardInterrupt: the run would train to its end
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_copy / "step-000003").exists():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    last = assert_one_line(out, "interrupted (Ctrl-C) at step", "pass --resume to continue from it", code=130)
    assert "step-00000" in last


def test_export_and_eval_refuse_code_named_by_the_checkpoint(tiny_model_dir, run_copy, tmp_path):
    config = run_copy / "final" / "config.yaml"
    import yaml

    data = yaml.safe_load(config.read_text())
    data["model"]["trust_remote_code"] = True
    data["reward"]["function"] = f"{tmp_path / 'evil.py'}:score"
    config.write_text(yaml.safe_dump(data))
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\ndef score(p, c, **k):\n"
                                      f"    return [0.0] * len(c)\n")
    for command in (["export", "--checkpoint", run_copy / "final", "--out", tmp_path / "merged"],
                    ["eval", "--checkpoint", run_copy / "final"]):
        out = subprocess.run([sys.executable, "-m", "llmrl", *map(str, command)], capture_output=True, text=True,
                             cwd=REPO, env=subprocess_env(), timeout=300)
        assert_one_line(out, "model.trust_remote_code: true", "pass --trust-checkpoint-code")
        assert not (tmp_path / "pwned").exists()


def test_export_refuses_non_finite_logits_and_tolerances(tiny_model_dir, run_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    path = run_copy / "final" / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, path)
    for extra, fragment in (([], "adapter_model.safetensors holds NaN or inf"),  # named before anything loads
                            (["--tolerance", "nan"], "--tolerance nan must be a finite number")):
        out = subprocess.run([sys.executable, "-m", "llmrl", "export", "--checkpoint", str(run_copy / "final"),
                              "--out", str(tmp_path / "merged"), *extra], capture_output=True, text=True, cwd=REPO,
                             env=subprocess_env(), timeout=300)
        assert_one_line(out, fragment)
        assert not (tmp_path / "merged").exists()
