"""The held-out set of a prompt file without data.eval_source: drawn by a hash of the prompt from the whole file
(the same in every process), a quarter of a small file with one line saying so, and data.eval_size 0 turning
evaluation off through the Python API, the summary, the plot and ``llmrl eval``."""
import json
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

import llmrl
from llmrl.config import DataConfig, EnvConfig, load_config
from llmrl.data.prompts import episode_rows, load_prompts
from llmrl.errors import ConfigError

TINY = REPO / "configs" / "tiny.yaml"


def write(path, prompts, **columns):
    path.write_text("".join(json.dumps({"prompt": p, **{k: v[i] for k, v in columns.items()}}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def sorted_by_region(n=400):
    # the issue's file: sorted by region, so its last rows are all one region
    return [f"What is the capital of country {i:03d} in region {i * 8 // n}?" for i in range(n)]


def test_the_held_out_rows_are_spread_over_the_file_not_its_last_rows(tmp_path):
    prompts = sorted_by_region()
    data = write(tmp_path / "p.jsonl", prompts, row=list(range(len(prompts))))
    train, evals = load_prompts(DataConfig(source=str(data), eval_size=40))
    assert len(evals) == 40 and len(train) == 360
    held = [r["row"] for r in evals]
    assert held != list(range(360, 400))
    assert len({i * 8 // 400 for i in held}) == 8  # every region of the sorted file has held-out rows
    assert max(held) - min(held) > 300
    # never trained on, nothing lost, and both sides in the file's order
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert sorted(r["row"] for r in train + evals) == list(range(400))
    assert [r["row"] for r in train] == sorted(r["row"] for r in train) and held == sorted(held)


def test_the_split_depends_on_the_prompts_alone_not_on_the_file_order_or_the_process(tmp_path):
    prompts = sorted_by_region()
    forward = write(tmp_path / "a.jsonl", prompts)
    backward = write(tmp_path / "b.jsonl", prompts[::-1])
    held = {r["prompt"] for r in load_prompts(DataConfig(source=str(forward), eval_size=40))[1]}
    assert held == {r["prompt"] for r in load_prompts(DataConfig(source=str(backward), eval_size=40))[1]}
    # another process with another string-hash seed (another run, another rank) holds out the same prompts
    code = ("import json, sys; from llmrl.config import DataConfig; from llmrl.data.prompts import load_prompts; "
            "print(json.dumps([r['prompt'] for r in load_prompts(DataConfig(source=sys.argv[1], eval_size=40))[1]]))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, str(forward)], capture_output=True, text=True, timeout=300,
                             env={**subprocess_env(), "PYTHONHASHSEED": seed}, check=True).stdout
        assert set(json.loads(out.splitlines()[-1])) == held


def test_copies_of_a_prompt_are_never_on_both_sides(tmp_path):
    # 5 prompts, each 4 times: whatever is held out, none of its copies is trained on
    prompts = [f"q{i % 5}" for i in range(20)]
    train, evals = load_prompts(DataConfig(source=str(write(tmp_path / "p.jsonl", prompts)), eval_size=5))
    assert evals and train and not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert len(evals) <= 5


def test_conversations_are_held_out_by_their_messages(tmp_path):
    prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}] for i in range(16)]
    train, evals = load_prompts(DataConfig(source=str(write(tmp_path / "c.jsonl", prompts)), eval_size=4))
    assert len(evals) == 4 and len(train) == 12
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in evals}


def test_a_small_file_holds_out_a_quarter_and_says_so(tmp_path):
    data = write(tmp_path / "p.jsonl", [f"q{i}" for i in range(32)])
    said = []
    train, evals = load_prompts(DataConfig(source=str(data)), say=said.append)  # eval_size: its default, 128
    assert len(evals) == 8 and len(train) == 24
    assert said == ["data.source has 32 rows: holding out 8 for evaluation (data.eval_size 128 is more than a "
                    "quarter)"]
    # an eval_size that fits in a quarter is taken as it is, without a word
    said.clear()
    train, evals = load_prompts(DataConfig(source=str(data), eval_size=8), say=said.append)
    assert len(evals) == 8 and said == []
    # two rows: one of each
    two = write(tmp_path / "two.jsonl", ["a", "b"])
    train, evals = load_prompts(DataConfig(source=str(two)), say=said.append)
    assert len(train) == 1 and len(evals) == 1


@pytest.mark.parametrize("prompts,eval_size,message", [
    (["only"], 128, r"has 1 row: holding one out for evaluation leaves nothing to train on; add rows, set "
                    r"data.eval_source, or set data.eval_size: 0 to skip evaluation"),
    (["same"] * 8, 2, r"has 8 rows: holding 2 \(every row has the same prompt\) out for evaluation leaves nothing"),
], ids=["one-row", "one-prompt"])
def test_nothing_left_to_train_on_is_refused(tmp_path, prompts, eval_size, message):
    data = write(tmp_path / "p.jsonl", prompts)
    with pytest.raises(ConfigError, match=rf"^data.source = '.*p.jsonl' {message}"):
        load_prompts(DataConfig(source=str(data), eval_size=eval_size))
    train, evals = load_prompts(DataConfig(source=str(data), eval_size=0))  # evaluation off: all of it is trained on
    assert len(train) == len(prompts) and evals == []


def test_episode_rows_from_a_file_are_held_out_by_hash_too(tmp_path):
    data = write(tmp_path / "e.jsonl", sorted_by_region(40), target=list(range(40)))
    env = EnvConfig(name="guess_number")
    train, evals = episode_rows(DataConfig(source=str(data), eval_size=4), env)
    assert len(evals) == 4 and len(train) == 36 and [r["target"] for r in evals] != [36, 37, 38, 39]
    assert episode_rows(DataConfig(source=str(data), eval_size=0), env)[1] == []
    assert episode_rows(DataConfig(eval_size=0), env)[1] == []  # seeds alone: no held-out episodes


def test_eval_size_zero_is_accepted_and_a_negative_one_refused(tmp_path):
    assert load_config(TINY, ["data.eval_size=0"]).data.eval_size == 0
    with pytest.raises(ConfigError, match=r"data.eval_size is -1: must be >= 0 \(0: no held-out set and no "
                                          r"evaluation\)"):
        load_config(TINY, ["data.eval_size=-1"])


class Evaluations(llmrl.Callback):
    def __init__(self):
        self.seen = []

    def on_evaluate(self, trainer, step, metrics):
        self.seen.append(step)


def test_evaluation_off_end_to_end_through_the_python_api(tiny_model_dir, tmp_path, capsys):
    from llmrl.cli.plot import plot_run

    words = ("abc", "bad", "cafe", "face", "dead", "bead", "fade", "ace")
    rows = [{"prompt": w + ">", "answer": w[::-1]} for w in words]
    calls = []

    def reward(prompts, completions, answer, **kwargs):
        calls.append(len(completions))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    seen = Evaluations()
    overrides = ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4",
                 "train.micro_batch_size=4", "train.epochs=1", "run.eval_every=1", "run.device=cpu", "run.threads=1",
                 "train.total_steps=2", "data.eval_size=0", f"model.name_or_path={tiny_model_dir}",
                 f"run.output_dir={tmp_path / 'run'}"]
    result = llmrl.RLTrainer(TINY, overrides=overrides, reward_funcs=[reward], train_dataset=rows,
                             callbacks=[seen]).train()
    out = capsys.readouterr().out
    assert result.summary["steps"] == 2 and calls == [8, 8]  # the two rollouts, no greedy evaluation
    assert result.summary["eval_reward_before"] is None and result.summary["eval_reward_after"] is None
    assert result.summary["eval_samples"] == [] and seen.seen == []
    assert not any(k.startswith("eval/") for r in result.metrics for k in r)
    assert [r["step"] for r in result.metrics if "reward/mean" in r] == [1, 2]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["eval_reward_after"] is None and saved["steps"] == 2
    assert "evaluation off (data.eval_size is 0)" in out and "done: 2 steps, no evaluation (data.eval_size 0)" in out
    assert plot_run(tmp_path / "run").is_file()
    # llmrl eval has no held-out prompts to score: one line saying what to pass
    with pytest.raises(ConfigError, match=r"^data.eval_size is 0: the run had evaluation off, so it has no held-out "
                                          r"prompts .*pass data.eval_source=FILE data.eval_size=N"):
        llmrl.evaluate(result.final_checkpoint)


@pytest.mark.parametrize("extra", [
    ["algorithm=dpo", "dpo.batch_size=4"],
    ["env.name=tests/test_envs.py:Echo", "env.max_turns=2", "env.max_episode_tokens=8", "reward.function=",
     "data.source=", "train.rollout_batch_size=4", "train.mini_batch_size=4"],
], ids=["dpo", "episodes"])
def test_evaluation_off_for_dpo_and_for_episodes(tiny_model_dir, tmp_path, extra):
    seen = Evaluations()
    overrides = ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4",
                 "train.micro_batch_size=4", "train.epochs=1", "run.device=cpu", "run.threads=1", "train.total_steps=1",
                 "data.eval_size=0", f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'run'}",
                 "warm_start=null", *extra]
    result = llmrl.RLTrainer(TINY, overrides=overrides, callbacks=[seen]).train()
    assert result.summary["steps"] == 1 and result.summary["eval_reward_after"] is None and seen.seen == []
    assert result.metrics and not any(k.startswith("eval/") for r in result.metrics for k in r)
