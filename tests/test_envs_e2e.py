"""Episodes against an environment through the real command lines: the tiny model learns guess_number, a run
resumes after kill -9, two DeepSpeed ranks play in step, ``llmrl eval`` writes the transcripts."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, launch_ppo, ppo_command, subprocess_env, training_rows

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs" / "guess_number.yaml"


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The shipped recipe (warm start, 100 steps of PPO), evaluated before and after only, in a temporary folder."""
    base = tmp_path_factory.mktemp("guess")
    out = subprocess.run(ppo_command([f"model.name_or_path={base / 'warm'}", f"run.output_dir={base / 'run'}",
                                      "run.progress=false", "run.eval_every=0"], ranks=0, config=CONFIG),
                         capture_output=True, text=True, timeout=900, cwd=REPO, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return base


def test_the_tiny_model_learns_to_use_the_feedback(learned):
    summary = json.loads((learned / "run" / "summary.json").read_text())
    before, after = summary["eval_reward_before"], summary["eval_reward_after"]
    # 256 held-out seeds, sampled: a standard error of ~0.03 on each rate
    assert after > before + 0.1, (before, after)
    rows = [json.loads(line) for line in (learned / "run" / "log.jsonl").read_text().splitlines()]
    metrics = [r for r in rows if "eval/success" in r]
    assert metrics[-1]["eval/success"] == pytest.approx(after)  # reward 1 is success in this game
    assert all(1 <= r["eval/turns"] <= 3 for r in metrics)
    samples = [s for r in rows if "samples" in r for s in r["samples"]]  # the transcripts of TensorBoard's table
    assert samples and all(s["prompt"] == "?" and s["completion"].startswith("> ") for s in samples)
    assert any("< +" in s["completion"] or "< -" in s["completion"] for s in samples)


def test_llmrl_eval_plays_held_out_episodes_and_writes_their_transcripts(learned, tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmrl", "eval", "--checkpoint", str(learned / "run" / "final"),
                          "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["prompts"] == 256 and result["reward_after"] > result["reward_before"]
    assert result["episodes_after"]["eval/success"] > result["episodes_before"]["eval/success"]
    assert all("ended:" in s["after"] for s in result["samples"])
    assert "> " in (tmp_path / "eval" / "eval.md").read_text()


COMMON = ["train.rollout_batch_size=16", "train.mini_batch_size=8", "train.micro_batch_size=8",
          "critic_free.num_generations=4", "run.eval_every=0", "data.eval_size=16", "run.progress=false",
          "run.threads=1", "run.save_every=2"]


def test_an_env_run_resumes_after_kill_9_with_the_same_episodes(learned, tmp_path):
    args = [*COMMON, f"model.name_or_path={learned / 'warm'}", "train.total_steps=4"]
    whole = subprocess.run(ppo_command([*args, f"run.output_dir={tmp_path / 'whole'}"], ranks=0, config=CONFIG),
                           capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(ppo_command([*args, "train.total_steps=400", f"run.output_dir={killed}"], ranks=0,
                                        config=CONFIG), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO, env=subprocess_env())
    deadline = time.time() + 300
    while not (killed / "step-000002" / "trainer_state.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "step-000002" / "trainer_state.pt").exists()
    resumed = subprocess.run(ppo_command([*args, f"run.output_dir={killed}", "--resume"], ranks=0, config=CONFIG),
                             capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = {r["step"]: r for r in training_rows(tmp_path / "whole")}
    b = {r["step"]: r for r in training_rows(killed)}
    for step in (3, 4):  # the environments are rebuilt from their seeds: the same episodes, the same rewards
        for key in ("reward/mean", "env/turns", "env/success"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
        assert abs(a[step]["loss/policy"] - b[step]["loss/policy"]) < 1e-5


def test_two_zero3_ranks_play_episodes_of_unequal_lengths_in_step(learned, tmp_path):
    """ZeRO-3 without gathered weights runs collectives in every forward: ranks whose episodes end at different
    turns must still sample together, or the run hangs."""
    out = launch_ppo([*COMMON, f"model.name_or_path={learned / 'warm'}", "train.total_steps=1",
                      "deepspeed.zero_stage=3", "deepspeed.gather_for_generation=false", "train.micro_batch_size=4",
                      "train.rollout_batch_size=8", "data.eval_size=4", f"run.output_dir={tmp_path / 'z3'}"],
                     ranks=2, config=CONFIG, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = training_rows(tmp_path / "z3")
    assert [r["step"] for r in rows] == [1] and 1 <= rows[0]["env/turns"] <= 3


def test_two_zero2_ranks_resume_an_env_run_with_the_same_episodes(learned, tmp_path):
    """Each rank rebuilds its environments from the seeds of its share of the rows: a run stopped after step 2
    and resumed on two ranks plays step 3 as the run that never stopped. REINFORCE with running reward
    normalisation: rank 0 writes the statistics every rank reloads, so they must span every rank's returns
    (this is also test_deepspeed's ZeRO-2 resume case)."""
    args = [*COMMON, f"model.name_or_path={learned / 'warm'}", "deepspeed.zero_stage=2", "train.micro_batch_size=4",
            "algorithm=reinforce", "reward.normalize=running"]
    whole = launch_ppo([*args, "train.total_steps=3", f"run.output_dir={tmp_path / 'whole'}"], config=CONFIG)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = launch_ppo([*args, "train.total_steps=2", f"run.output_dir={tmp_path / 'split'}"], config=CONFIG)
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch_ppo([*args, "train.total_steps=3", f"run.output_dir={tmp_path / 'split'}", "--resume"],
                        config=CONFIG)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    a, b = training_rows(tmp_path / "whole"), training_rows(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("reward/mean", "env/turns", "env/success"):
        assert a[-1][key] == b[-1][key], (key, a[-1][key], b[-1][key])
    for key in ("loss/policy", "objective/kl"):
        assert abs(a[-1][key] - b[-1][key]) < 1e-5, (key, a[-1][key], b[-1][key])
    assert a[-1]["objective/kl"] != 0  # the policy moved in steps 1-2: the resumed run had to reload it


def test_an_env_run_exports_and_its_check_uses_the_held_out_episodes(learned, tmp_path):
    from llmrl.exporter import FIXED_TEXT, load_checkpoint_config, sample_inputs
    from transformers import AutoTokenizer

    final = learned / "run" / "final"
    out = subprocess.run([sys.executable, "-m", "llmrl", "export", "--checkpoint", str(final), "--out",
                          str(tmp_path / "merged")], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max logit difference" in out.stdout and (tmp_path / "merged" / "model.safetensors").is_file()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "| environment | `guess_number`" in card and "| prompts |" not in card
    cfg, tokenizer = load_checkpoint_config(final), AutoTokenizer.from_pretrained(final / "tokenizer")
    assert sample_inputs(cfg, tokenizer) == ["?"] * 8  # the first observation of each held-out episode
    cfg.env.name = f"{tmp_path / 'evil.py'}:Env"  # a checkpoint's own environment file: not imported
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\nclass Env:\n    pass\n")
    assert sample_inputs(cfg, tokenizer) == FIXED_TEXT and not (tmp_path / "pwned").exists()


def test_eval_refuses_an_environment_file_named_by_the_checkpoint(learned, tmp_path):
    import shutil

    import yaml

    checkpoint = tmp_path / "final"
    shutil.copytree(learned / "run" / "final", checkpoint)
    data = yaml.safe_load((checkpoint / "config.yaml").read_text())
    data["env"]["name"] = f"{tmp_path / 'evil.py'}:Env"
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\nclass Env:\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "llmrl", "eval", "--checkpoint", str(checkpoint)],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=subprocess_env())
    assert out.returncode == 2 and "env.name" in out.stderr and "--trust-checkpoint-code" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()
