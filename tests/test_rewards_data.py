"""Rewards and prompts: user rewards load from a module or a file anywhere; bad outputs and bad data fail
with messages naming the reward, the sample or the value."""
import json
import math
import time

import pytest

from llmrl.config import ConfigError, DataConfig, RewardComponentConfig, RewardConfig
from llmrl.data.prompts import check_prompt_lengths, load_prompts
from llmrl.data.tasks import task_rows
from llmrl.rewards.base import RewardError, build_reward, call_reward, load_reward_function


def test_reward_from_module_path():
    fn = load_reward_function("reward_models.rules:exact_match")
    assert call_reward(fn, "em", ["ab>"], ["ba"], answer=["ba"]) == [1.0]


def test_trl_style_reward_file_outside_the_repository(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def brevity(prompts, completions, **kwargs):\n"
                    "    return [-len(c) / 10 for c in completions]\n")
    fn = load_reward_function(f"{path}:brevity")
    assert call_reward(fn, "brevity", ["p", "q"], ["abc", ""], completion_ids=[[1], [2]]) == [-0.3, -0.0]


@pytest.mark.parametrize("spec,match", [
    ("no_colon", "must be a built-in name"),
    ("not_a_module_xyz:f", "cannot import 'not_a_module_xyz'"),
    ("reward_models.rules:nope", "has no callable named 'nope'"),
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
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(12)))
    train, evals = load_prompts(DataConfig(source=str(path), eval_size=3))
    assert len(train) == 9 and len(evals) == 3 and {"prompt": "q0", "answer": "0"} in train + evals
    assert all(row["answer"] == row["prompt"][1:] for row in train + evals)  # the other columns stay with their row

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"data.source = '.*empty.jsonl' is an empty file"):
        load_prompts(DataConfig(source=str(empty), eval_size=3))
    with pytest.raises(ConfigError, match=r"data.source has no column 'text'"):
        load_prompts(DataConfig(source=str(path), prompt_column="text", eval_size=3))
    with pytest.raises(ConfigError, match=r"data.source = '.*missing.jsonl' does not exist"):
        load_prompts(DataConfig(source=str(tmp_path / "missing.jsonl")))
    # conversations in TRL's format load as they are (the chat template renders them later)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(5)))
    train, _ = load_prompts(DataConfig(source=str(chat), eval_size=2))
    assert train[0]["prompt"] == [{"role": "user", "content": "q0"}]
    broken = tmp_path / "broken_chat.jsonl"
    broken.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": 5 if i == 1 else "q"}]}) + "\n"
                              for i in range(5)))
    with pytest.raises(ConfigError, match=r"data.source: prompt 1 has message 0 = .* each message needs a string "
                                          r"role and a string content"):
        load_prompts(DataConfig(source=str(broken), eval_size=2))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"prompt": "q" if i else 7}) + "\n" for i in range(5)))
    with pytest.raises(ConfigError, match=r"data.source: prompt 0 is int '7', neither text nor a list of messages"):
        load_prompts(DataConfig(source=str(numbers), eval_size=2))


def test_prompts_longer_than_the_limit_are_rejected(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "ab>"}, {"prompt": "abcdefabcdef>"}]
    check_prompt_lengths(rows[:1], "prompt", tok, max_prompt_length=8, max_new_tokens=4, context=32)
    with pytest.raises(ConfigError, match=r"data.source: prompt 1 has 13 tokens, more than 8 \(data.max_prompt_length = 8\)"):
        check_prompt_lengths(rows, "prompt", tok, max_prompt_length=8, max_new_tokens=4, context=32)
    with pytest.raises(ConfigError, match=r"more than 10 \(the model's context 16 minus"):
        check_prompt_lengths(rows, "prompt", tok, max_prompt_length=64, max_new_tokens=6, context=16)


def write_module(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return path


def test_components_are_weighted_and_none_means_not_applicable(tmp_path):
    path = write_module(tmp_path, "parts", (
        "def length(prompts, completions, **kw):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def only_even(prompts, completions, **kw):\n"
        "    return [10.0 if i % 2 == 0 else None for i in range(len(completions))]\n"))
    reward = build_reward(RewardConfig(components=[
        RewardComponentConfig(function=f"{path}:length", weight=0.5),
        RewardComponentConfig(function=f"{path}:only_even", weight=2.0, name="even"),
    ]))
    result = reward(["p"] * 3, ["ab", "abcd", ""])
    # sample 0: 0.5 * 2 + 2 * 10 = 21; sample 1: 0.5 * 4 (even does not apply) = 2; sample 2: 0 + 20 = 20
    assert result.scores == [21.0, 2.0, 20.0] and result.valid == [True, True, True]
    assert result.metrics["reward/length/mean"] == pytest.approx(2.0)
    assert result.metrics["reward/even/mean"] == 10.0
    assert result.metrics["reward/even/none_rate"] == pytest.approx(1 / 3)


def test_builtin_names_static_kwargs_and_dataset_columns():
    reward = build_reward(RewardConfig(components=[
        RewardComponentConfig(function="exact_match"),
        RewardComponentConfig(function="regex_format", kwargs={"pattern": "[a-f]+"}, weight=0.1),
    ]))
    result = reward(["abc>", "ab>"], ["cba", "b!"], answer=["cba", "ba"])
    assert result.scores == pytest.approx([1.1, 0.0])


def test_a_sample_no_component_applies_to_is_an_error_or_skipped():
    cfg = RewardConfig(function="numeric_match")
    with pytest.raises(RewardError, match=r"no reward applies to sample 1"):
        build_reward(cfg)(["q", "q"], ["4", "4"], answer=[4, None])
    cfg.on_error = "skip"
    result = build_reward(cfg)(["q", "q"], ["4", "4"], answer=[4, None])
    assert result.valid == [True, False] and result.metrics["reward/skipped"] == 1.0


def test_a_reward_argument_the_data_lacks_is_found_at_start_up():
    exact = build_reward(RewardConfig(function="exact_match"))
    exact.check_arguments({"answer"}, "task:reverse")  # the column it needs is there
    # it used to fail only at the first rollout, as "exact_match() missing 1 required positional argument"
    with pytest.raises(ConfigError, match=r"reward 'exact_match' requires 'answer', but it is called with prompts, "
                                          r"completions, completion_ids and the other columns of data.source = "
                                          r"'p.jsonl' \(id\): add such a column"):
        exact.check_arguments({"id"}, "p.jsonl")
    # given in the component's kwargs instead, or not required (defaults, **kwargs): fine
    with_kwargs = build_reward(RewardConfig(components=[RewardComponentConfig(function="exact_match",
                                                                              kwargs={"answer": ["x"]})]))
    with_kwargs.check_arguments(set(), "p.jsonl")
    build_reward(RewardConfig(function="length_target")).check_arguments(set(), "p.jsonl")


def test_async_reward_functions_work(tmp_path):
    path = write_module(tmp_path, "aio", (
        "import asyncio\n"
        "async def slow_len(prompts, completions, **kw):\n"
        "    await asyncio.sleep(0.01)\n"
        "    return [len(c) for c in completions]\n"))
    assert build_reward(RewardConfig(function=f"{path}:slow_len"))(["p"], ["abc"]).scores == [3.0]


def test_a_hanging_reward_fails_after_its_timeout(tmp_path):
    path = write_module(tmp_path, "hang", (
        "import time\n"
        "def hang(prompts, completions, **kw):\n"
        "    time.sleep(60)\n"))
    reward = build_reward(RewardConfig(function=f"{path}:hang", timeout=0.3))
    start = time.time()
    with pytest.raises(RewardError, match=r"reward 'hang' did not return within 0.3 s"):
        reward(["p"], ["x"])
    assert time.time() - start < 5


def test_skip_mode_drops_bad_samples_and_counts_them(tmp_path):
    path = write_module(tmp_path, "bad", (
        "def some_nan(prompts, completions, **kw):\n"
        "    return [1.0, float('nan'), 'high']\n"
        "def broken(prompts, completions, **kw):\n"
        "    raise ValueError('down')\n"))
    result = build_reward(RewardConfig(function=f"{path}:some_nan", on_error="skip"))(["p"] * 3, ["a", "b", "c"])
    assert result.valid == [True, False, False]
    assert result.metrics["reward/some_nan/invalid"] == 2.0 and result.metrics["reward/skipped"] == 2.0
    result = build_reward(RewardConfig(function=f"{path}:broken", on_error="skip"))(["p"] * 2, ["a", "b"])
    assert result.valid == [False, False] and result.metrics["reward/broken/errors"] == 1.0
    with pytest.raises(RewardError, match=r"reward 'some_nan' returned nan for sample 1"):
        build_reward(RewardConfig(function=f"{path}:some_nan"))(["p"] * 3, ["a", "b", "c"])


def test_component_needs_exactly_one_kind():
    with pytest.raises(ConfigError, match=r"reward.components\[0\] must set exactly one of function, model or url"):
        build_reward(RewardConfig(components=[RewardComponentConfig(function="exact_match", url="http://x")]))
    with pytest.raises(ConfigError, match="are both set"):
        build_reward(RewardConfig(function="exact_match", components=[RewardComponentConfig(function="keywords")]))


def test_running_mean_std_matches_numpy_style_reference():
    import torch

    from llmrl.rl import RunningMeanStd

    torch.manual_seed(0)
    data = torch.randn(100) * 3 + 2
    stats = RunningMeanStd()
    for chunk in data.split(7):
        stats.update(chunk)
    assert stats.mean == pytest.approx(data.mean().item(), abs=1e-6)
    assert stats.std == pytest.approx(data.std(unbiased=False).item(), abs=1e-6)
