"""Rewards and prompts: user rewards load from a module or a file anywhere; bad outputs and bad data fail
with messages naming the reward, the sample or the value."""
import json
import math

import pytest

from llmrl.config import ConfigError, DataConfig
from llmrl.data import check_prompt_lengths, load_prompts
from llmrl.rewards import RewardError, call_reward, load_reward_function
from llmrl.tasks import task_rows


def test_reward_from_module_path():
    fn = load_reward_function("reward_models.string_tasks:exact_match")
    assert call_reward(fn, "em", ["ab>"], ["ba"], answer=["ba"]) == [1.0]


def test_trl_style_reward_file_outside_the_repository(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def brevity(prompts, completions, **kwargs):\n"
                    "    return [-len(c) / 10 for c in completions]\n")
    fn = load_reward_function(f"{path}:brevity")
    assert call_reward(fn, "brevity", ["p", "q"], ["abc", ""], completion_ids=[[1], [2]]) == [-0.3, -0.0]


@pytest.mark.parametrize("spec,match", [
    ("no_colon", "must look like"),
    ("not_a_module_xyz:f", "cannot import 'not_a_module_xyz'"),
    ("reward_models.string_tasks:nope", "has no callable named 'nope'"),
    ("/no/such/file.py:f", "file '/no/such/file.py' does not exist"),
])
def test_bad_reward_paths_fail_at_start_up(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_reward_function(spec)


def raising(prompts, completions, **kw):
    raise KeyError("answer")


@pytest.mark.parametrize("fn,match", [
    (raising, r"reward 'r' raised KeyError\('answer'\)"),
    (lambda prompts, completions, **kw: [1.0], r"returned 1 values for 2 completions"),
    (lambda prompts, completions, **kw: [1.0, math.nan], r"returned nan for sample 1"),
    (lambda prompts, completions, **kw: [math.inf, 0.0], r"returned inf for sample 0"),
    (lambda prompts, completions, **kw: [0.0, "good"], r"returned 'good' \(str\) for sample 1"),
    (lambda prompts, completions, **kw: [None, 0.0], r"returned None \(NoneType\) for sample 0"),
    (lambda prompts, completions, **kw: 3.0, r"returned float, not a list"),
])
def test_bad_reward_outputs_name_the_reward_and_sample(fn, match):
    with pytest.raises(RewardError, match=match):
        call_reward(fn, "r", ["a>", "b>"], ["x", "y"])


def test_task_splits_are_disjoint_and_answers_are_right():
    train = task_rows("reverse", "abc", 2, 4, 0.2, "train")
    evals = task_rows("reverse", "abc", 2, 4, 0.2, "eval")
    assert len(train) + len(evals) == 9 + 27 + 81
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert all(r["answer"] == r["prompt"][:-1][::-1] for r in train + evals)
    with pytest.raises(ValueError, match="unknown task 'rev'"):
        task_rows("rev", "abc", 2, 4, 0.2, "train")


def test_prompt_file_other_columns_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    train, evals = load_prompts(DataConfig(source=str(path), eval_size=3))
    assert len(train) == 7 and len(evals) == 3 and train[0] == {"prompt": "q0", "answer": "0"}

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"data.source = '.*empty.jsonl' is an empty file"):
        load_prompts(DataConfig(source=str(empty), eval_size=3))
    with pytest.raises(ConfigError, match=r"data.source has no column 'text'"):
        load_prompts(DataConfig(source=str(path), prompt_column="text", eval_size=3))
    with pytest.raises(ConfigError, match=r"data.source = '.*missing.jsonl' does not exist"):
        load_prompts(DataConfig(source=str(tmp_path / "missing.jsonl")))


def test_prompts_longer_than_the_limit_are_rejected(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "ab>"}, {"prompt": "abcdefabcdef>"}]
    check_prompt_lengths(rows[:1], "prompt", tok, max_prompt_length=8, max_new_tokens=4, context=32)
    with pytest.raises(ConfigError, match=r"prompt 1 has 13 tokens, more than 8 \(data.max_prompt_length = 8\)"):
        check_prompt_lengths(rows, "prompt", tok, max_prompt_length=8, max_new_tokens=4, context=32)
    with pytest.raises(ConfigError, match=r"more than 10 \(the model's context 16 minus"):
        check_prompt_lengths(rows, "prompt", tok, max_prompt_length=64, max_new_tokens=6, context=16)
