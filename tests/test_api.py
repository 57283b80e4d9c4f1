"""llmrl from Python (``llmrl.RLTrainer``): in-memory rewards, datasets, models and environments, callbacks that
see the logged numbers and stop a run, resume from Python, one line for each bad input, and the docs' example run
as written."""
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, launch_ppo, subprocess_env

import llmrl
from llmrl.errors import ConfigError, UserError

TINY = REPO / "configs" / "tiny.yaml"
SMALL = ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=4",
         "train.epochs=1", "run.eval_every=0", "run.device=cpu", "run.threads=1", "train.total_steps=2"]
WORDS = ["abc", "bad", "cafe", "face", "dead", "bead", "fade", "deaf", "ace", "bee", "cab", "fed", "dab", "add"]
ROWS = [{"prompt": w + ">", "answer": w[::-1]} for w in WORDS]


def settings(model_dir, run_dir, *extra):
    return [*SMALL, f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}", *extra]


class Recorder(llmrl.Callback):
    def __init__(self, stop_at=None):
        self.steps, self.evaluations, self.saves, self.stop_at = [], [], [], stop_at

    def on_step_end(self, trainer, step, metrics):
        self.steps.append((step, dict(metrics)))
        if self.stop_at is not None and step >= self.stop_at:
            trainer.stop()

    def on_evaluate(self, trainer, step, metrics):
        self.evaluations.append((step, dict(metrics)))

    def on_save(self, trainer, step, path):
        self.saves.append((step, Path(path).name, (Path(path) / "trainer_state.pt").is_file()))


def logged_component(metrics, step, name="reversed_exactly"):
    return next(r[f"reward/{name}/mean"] for r in metrics if r.get("step") == step and f"reward/{name}/mean" in r)


def test_a_closure_reward_and_an_in_memory_dataset_train_and_callbacks_see_what_is_logged(tiny_model_dir, tmp_path):
    calls = []

    def make_reward(weight):
        def reversed_exactly(prompts, completions, answer, **kwargs):
            scores = [weight * (float(c.strip() == a) + len(c) % 3) for c, a in zip(completions, answer)]
            calls.append(scores)
            return scores
        return reversed_exactly

    recorder = Recorder()
    result = llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, tmp_path / "run", "run.save_every=1"),
                             reward_funcs=[make_reward(2.0)], train_dataset=ROWS[:10], eval_dataset=ROWS[10:],
                             callbacks=[recorder]).train()
    assert result.summary["steps"] == 2 and not result.stopped_early
    # the closure scored the evaluation before (4 prompts), then each rollout (8 samples): its numbers are logged
    assert [len(c) for c in calls[:3]] == [4, 8, 8]
    for step, scores in ((1, calls[1]), (2, calls[2])):
        assert logged_component(result.metrics, step) == pytest.approx(sum(scores) / len(scores))
    # on_step_end gets exactly the numbers log.jsonl holds for that step
    logged = {r["step"]: r for r in result.metrics if "reward/mean" in r}
    assert [s for s, _ in recorder.steps] == [1, 2]
    for step, metrics in recorder.steps:
        assert metrics["reward/mean"] == pytest.approx(logged[step]["reward/mean"])
    # evaluations before (step 0) and after (step 2), with what the summary says
    assert [s for s, _ in recorder.evaluations] == [0, 2]
    assert recorder.evaluations[0][1]["eval/reward"] == pytest.approx(result.summary["eval_reward_before"])
    assert recorder.evaluations[-1][1]["eval/reward"] == pytest.approx(result.summary["eval_reward_after"])
    assert result.summary["eval_reward_before"] == pytest.approx(sum(calls[0]) / 4)
    assert ("final", True) in [(name, complete) for _, name, complete in recorder.saves]
    assert result.final_checkpoint == tmp_path / "run" / "final"
    assert type(result.model).__name__.startswith("Peft") and result.tokenizer is not None
    # the checkpoint records the objects by name; the dataset's name carries its rows' count and hash
    saved = yaml.safe_load((result.final_checkpoint / "config.yaml").read_text())
    assert saved["reward"]["components"][0]["function"] == "in-memory:reversed_exactly"
    assert saved["reward"]["components"][0]["weight"] == 1.0
    assert re.fullmatch(r"in-memory:train_dataset-10rows-[0-9a-f]{12}", saved["data"]["source"])
    assert re.fullmatch(r"in-memory:eval_dataset-4rows-[0-9a-f]{12}", saved["data"]["eval_source"])
    # evaluation from Python, in the process that holds the objects: the same held-out reward, by the closure
    scored = len(calls)
    evaluation = llmrl.evaluate(result.final_checkpoint, n_samples=2)
    assert len(calls) > scored
    assert evaluation["reward_after"] == pytest.approx(result.summary["eval_reward_after"])
    assert evaluation["reward_before"] == pytest.approx(result.summary["eval_reward_before"])


def test_two_runs_in_one_process_a_lambda_an_async_reward_a_dataset_and_a_callback_that_stops(tiny_model_dir,
                                                                                            tmp_path):
    from datasets import Dataset

    async def async_reward(prompts, completions, answer, **kwargs):
        await asyncio.sleep(0)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    stopper = Recorder(stop_at=1)
    first = llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, tmp_path / "a", "train.total_steps=5"),
                            reward_funcs=[async_reward, lambda prompts, completions, **kw: [0.5] * len(completions)],
                            reward_weights=[1.0, 2.0], train_dataset=Dataset.from_list(ROWS[:10]),
                            eval_dataset=ROWS[10:], callbacks=[stopper]).train()
    assert first.stopped_early and first.summary["steps"] == 1
    assert [s for s, _ in stopper.steps] == [1]
    assert (tmp_path / "a" / "final" / "trainer_state.pt").is_file()  # stopped cleanly: evaluated and saved
    assert [s for s, _ in stopper.evaluations] == [0, 1]
    # the lambda's constant 0.5 at weight 2 adds exactly 1.0 to every sample's reward
    step1 = [r for r in first.metrics if "reward/mean" in r][0]
    assert step1["reward/reward_1/mean"] == pytest.approx(0.5)
    saved = yaml.safe_load((tmp_path / "a" / "final" / "config.yaml").read_text())
    assert [c["function"] for c in saved["reward"]["components"]] == ["in-memory:async_reward", "in-memory:reward_1"]

    as_dict = yaml.safe_load(TINY.read_text())  # a config given as a dict
    second = llmrl.RLTrainer(as_dict, overrides=settings(tiny_model_dir, tmp_path / "b", "algorithm=grpo"),
                             reward_funcs="exact_match", train_dataset=ROWS[:10], eval_dataset=ROWS[10:]).train()
    assert second.summary["steps"] == 2 and not second.stopped_early
    assert yaml.safe_load((tmp_path / "b" / "final" / "config.yaml").read_text())["algorithm"] == "grpo"
    assert second.model is not first.model


def test_resume_from_python_needs_the_same_objects_and_the_command_line_says_so(tiny_model_dir, tmp_path):
    def reward(prompts, completions, answer, **kwargs):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    run = tmp_path / "run"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, run), reward_funcs=[reward], train_dataset=ROWS[:10],
                    eval_dataset=ROWS[10:]).train()
    config = run / "final" / "config.yaml"
    # the command line was not given the function: one line naming it and what to do
    out = launch_ppo([*SMALL, "train.total_steps=3", "--resume"], ranks=0, config=config)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert last.startswith("error: reward.components[0].function = 'in-memory:reward' was a Python object given "
                           "to llmrl.RLTrainer"), last
    # other rows are a change of data.source, refused as any resume that changes the data
    with pytest.raises(ConfigError, match=r"data\.source"):
        llmrl.RLTrainer(config, overrides=["train.total_steps=3"], reward_funcs=[reward], train_dataset=ROWS[:9],
                        eval_dataset=ROWS[10:], resume=True).train()
    # the same objects: it goes on from step 2
    resumed = llmrl.RLTrainer(config, overrides=["train.total_steps=3"], reward_funcs=[reward],
                              train_dataset=ROWS[:10], eval_dataset=ROWS[10:], resume=True).train()
    assert resumed.summary["steps"] == 3
    assert [r["step"] for r in resumed.metrics if "reward/mean" in r] == [1, 2, 3]


def test_a_model_object_is_saved_with_the_run_and_exports_from_the_command_line(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    run = tmp_path / "run"
    config = llmrl.load_config(TINY, [f"run.output_dir={run}"])  # a Config object, with overrides on top
    result = llmrl.RLTrainer(config, overrides=SMALL, model=model, tokenizer=tokenizer,
                             reward_funcs=["exact_match"], train_dataset=ROWS[:10], eval_dataset=ROWS[10:]).train()
    assert result.summary["steps"] == 2
    assert (run / "base" / "config.json").is_file()
    saved = yaml.safe_load((run / "final" / "config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(run / "base")
    out = subprocess.run([sys.executable, "-m", "llmrl", "export", "--checkpoint", str(run / "final"), "--out",
                          str(tmp_path / "exported")], capture_output=True, text=True, cwd=REPO, env=subprocess_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_a_reward_model_object_and_a_string_mix_with_a_function(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    from llmrl.models.reward_model import LearnedReward

    learned = LearnedReward(str(tiny_reward_model_dir), batch_size=4, max_length=32)
    result = llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, tmp_path / "run", "train.total_steps=1"),
                             reward_funcs=[learned, "exact_match"], reward_weights=[0.5, 1.0],
                             train_dataset=ROWS[:10], eval_dataset=ROWS[10:]).train()
    step = [r for r in result.metrics if "reward/mean" in r][0]
    # the learned model scored the samples (a real-valued score), under its class's name
    assert "reward/LearnedReward/mean" in step and "reward/exact_match/mean" in step
    saved = yaml.safe_load((tmp_path / "run" / "final" / "config.yaml").read_text())
    assert [c["function"] for c in saved["reward"]["components"]] == ["in-memory:LearnedReward", "exact_match"]
    assert [c["weight"] for c in saved["reward"]["components"]] == [0.5, 1.0]


def test_a_peft_model_is_merged_into_a_copy_that_the_run_starts_from(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))  # a non-zero adapter
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("abc>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = sft(input_ids=ids).logits
        plain = sft.get_base_model()
        with sft.disable_adapter():
            base_logits = sft(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits)  # the adapter matters
    llmrl.RLTrainer(TINY, overrides=[*SMALL, f"run.output_dir={tmp_path / 'run'}", "train.total_steps=1"],
                    model=sft, tokenizer=tokenizer, reward_funcs=["exact_match"], train_dataset=ROWS[:10],
                    eval_dataset=ROWS[10:]).train()
    # the run's base is the merged model: its logits are the peft model's
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(sft(input_ids=ids).logits, expected)  # the user's model is as it was
    assert plain is sft.get_base_model() and hasattr(sft, "peft_config")


def test_an_environment_class(tmp_path, tiny_model_dir):
    from llmrl.envs.guess_number import GuessNumber

    recorder = Recorder()
    result = llmrl.RLTrainer(REPO / "configs" / "guess_number.yaml",
                             overrides=[*SMALL, f"run.output_dir={tmp_path / 'run'}", "model.name_or_path="
                                        f"{tiny_model_dir}", "data.eval_size=4", "warm_start=null"],
                             env=GuessNumber, callbacks=[recorder]).train()
    assert result.summary["steps"] == 2
    assert "env/turns" in recorder.steps[-1][1]
    saved = yaml.safe_load((tmp_path / "run" / "final" / "config.yaml").read_text())
    assert saved["env"]["name"] == "in-memory:GuessNumber"


def bad(call, *fragments):
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_input_is_one_line_naming_it(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    over = settings(tiny_model_dir, tmp_path / "run")

    def no_completions(texts):
        return [0.0] * len(texts)

    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, reward_funcs=[no_completions]),
        "reward_funcs[0] = no_completions(texts) takes no prompts and no completions")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, reward_funcs=[42]), "reward_funcs[0] = '42' is a int")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, reward_funcs=["exact_match"], reward_weights=[1, 2]),
        "reward_weights has 2 values for 1 reward_funcs")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, train_dataset={"prompt": ["a>"]}),
        "train_dataset is a dict: give a datasets.Dataset or a list of dicts")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, train_dataset=[{"text": "abc>"}] * 20).train(),
        "has no column 'prompt'", "set data.prompt_column")
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, model=classifier,
                                tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir)),
        "model is a GPT2ForSequenceClassification, not a causal LM")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, model=object()), "model is a object")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, model=AutoModelForCausalLM.from_pretrained(tiny_model_dir)),
        "model is an object: pass its tokenizer object too")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over, callbacks=[object()]), "has none of on_step_end")
    bad(lambda: llmrl.RLTrainer(TINY, overrides=over + ["train.lr=-1"]), "train.lr")
    bad(lambda: llmrl.RLTrainer(42), "config is a int")

    class Broken(llmrl.Callback):
        def on_step_end(self, trainer, step, metrics):
            raise KeyError("reward/men")

    with pytest.raises(UserError) as kept:  # kept: as a notebook keeps the last traceback, with its frames
        llmrl.RLTrainer(TINY, overrides=over, reward_funcs="exact_match", train_dataset=ROWS[:10],
                        eval_dataset=ROWS[10:], callbacks=[Broken()]).train()
    assert str(kept.value).startswith("callback test_bad_input_is_one_line_naming_it.<locals>.Broken.on_step_end "
                                      "raised KeyError at step 1: 'reward/men': fix the callback"), str(kept.value)
    # the failed run released its folder's lock (though the traceback above keeps its frames): a new run in this
    # process may replace it
    again = llmrl.RLTrainer(TINY, overrides=over + ["train.total_steps=1"], reward_funcs="exact_match",
                            train_dataset=ROWS[:10], eval_dataset=ROWS[10:], overwrite=True).train()
    assert again.summary["steps"] == 1


def test_the_docs_python_example_runs_as_written(tiny_model_dir, tmp_path):
    """docs/python.md's example, run in a folder holding configs/ and the tiny recipe's warm-started model (so that
    the warm start, a minute on its own, is not run again)."""
    text = (REPO / "docs" / "python.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "tiny-warm-start")
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, cwd=tmp_path,
                         env={**subprocess_env(), "PYTHONPATH": str(REPO)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"PPO: 2 steps, eval reward \S+ -> \S+ stopped early: True", out.stdout), out.stdout
    assert "GRPO: 6 steps; trained model: Peft" in out.stdout, out.stdout
    assert (tmp_path / "runs" / "python-ppo-export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "python-grpo" / "summary.json").read_text())["steps"] == 6
    assert os.listdir(tmp_path / "runs" / "python-ppo" / "final")


def test_a_resume_keeps_the_runs_own_settings_and_applies_only_what_is_given(tiny_model_dir, tmp_path, capsys):
    """The run was started with overrides (sizes, model, lr); the resume names only the run and what changes."""
    from helpers import training_rows

    from llmrl.cli.train import main

    run = tmp_path / "run"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, run, "train.lr=0.0003")).train()
    capsys.readouterr()
    resumed = llmrl.RLTrainer(TINY, overrides=[f"run.output_dir={run}", "train.total_steps=3"], resume=True)
    assert (resumed.cfg.train.lr, resumed.cfg.train.rollout_batch_size, resumed.cfg.model.name_or_path) == \
        (0.0003, 8, str(tiny_model_dir))
    assert resumed.train().summary["steps"] == 3
    printed = capsys.readouterr().out
    # what tiny.yaml says otherwise is reported, not applied
    assert "note: " in printed and "train.lr = 0.001, the run's own config 0.0003: the run's is kept" in printed
    assert [(r["step"], r["optim/lr"]) for r in training_rows(run)][-1] == (3, 0.0003)
    # the command line: no --config, the run named by run.output_dir; a new lr applies from step 4
    assert main(["--resume", f"run.output_dir={run}", "train.total_steps=4", "train.lr=0.0001"]) == 0
    assert [(r["step"], r["optim/lr"]) for r in training_rows(run)][-2:] == [(3, 0.0003), (4, 0.0001)]
    saved = yaml.safe_load((run / "final" / "config.yaml").read_text())
    assert saved["train"]["rollout_batch_size"] == 8 and saved["model"]["name_or_path"] == str(tiny_model_dir)


@pytest.mark.parametrize("change", ["lora.r=4", "algorithm=grpo", "model.name_or_path=gpt2"])
def test_a_resume_that_changes_what_the_run_is_is_one_line_before_anything_loads(tiny_model_dir, tmp_path, change):
    run = tmp_path / "run"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, run, "train.total_steps=1")).train()
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^--resume: {re.escape(key)} .* differ from the checkpoint's settings"):
        llmrl.RLTrainer(None, overrides=[f"run.output_dir={run}", change], resume=True)  # not .train()


def test_offline_kto_and_ilql_from_python_and_the_ilql_policy_sampled_from_the_result(tiny_model_dir, tmp_path):
    """RLTrainer trains KTO and ILQL from logged files as the command line does; an ILQL result holds its heads,
    and llmrl.ilql_generate decodes the learned policy with them: at beta 0 the LM alone (the heads unread), at a
    large beta the token the heads favour."""
    import torch

    logs = REPO / "configs" / "data" / "offline" / "tiny"
    kto = llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, tmp_path / "kto", "algorithm=kto",
                                                   f"kto.data={logs / 'labelled.jsonl'}", "kto.batch_size=8",
                                                   "kto.desirable_share=0.5", "data.eval_size=4")).train()
    assert kto.summary["steps"] == 2 and kto.ilql_heads is None
    assert [r["step"] for r in kto.metrics if "loss/kto" in r] == [1, 2]

    result = llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, tmp_path / "ilql", "algorithm=ilql",
                                                      f"ilql.data={logs / 'rewarded.jsonl'}", "ilql.batch_size=8",
                                                      "data.eval_size=4")).train()
    heads, tok = result.ilql_heads, result.tokenizer
    assert type(heads).__name__ == "ILQLHeads" and (result.final_checkpoint / "ilql_heads.safetensors").is_file()
    prompts = ["abc>", "fed>", "cab>"]

    def answers(beta: float) -> list[str]:
        exp = llmrl.ilql_generate(result.model, heads, tok, prompts, beta=beta, top_k=20, greedy=True,
                                  max_new_tokens=5)
        return [tok.decode(r[m.bool()]) for r, m in zip(exp.response, exp.response_mask)]

    lm_alone = answers(0.0)
    c = tok.convert_tokens_to_ids("c")
    with torch.no_grad():
        for head in heads.target_q_heads:
            head[-1].bias[c] += 100.0  # Q_target - V large on "c" only
    assert answers(0.0) == lm_alone
    assert answers(10.0) == ["ccccc"] * 3 != lm_alone
