"""Hostile inputs of issue 26, rows 6-9: sizes that hung (a 10 MB observation or prompt, a YAML alias chain),
silent wrong results (duplicate YAML keys, a missing answer compared with "None", whitespace and NUL prompts) and
nonsense settings accepted or met with a traceback. Each ends in one line naming the value, before any work."""
import json
import subprocess
import sys
import time

import pytest
from helpers import REPO, assert_one_line, launch_ppo, ppo_command, subprocess_env

from llmrl.config import ConfigError, DataConfig, EnvConfig, RewardConfig, load_config, load_yaml_text, save_config
from llmrl.data.prompts import check_prompt_lengths, load_prompts
from llmrl.errors import EnvError, RewardError

TINY = REPO / "configs" / "tiny.yaml"
SMALL = ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=4",
         "train.epochs=1", "data.eval_size=8", "run.eval_every=0", "run.device=cpu", "run.threads=1",
         "train.total_steps=1"]


def ppo(tmp_path, *args, config=TINY, timeout=300):
    """launch/ppo.py in one process; the model folder does not matter for errors raised at load."""
    return launch_ppo([*SMALL, f"run.output_dir={tmp_path / 'run'}", *args], ranks=0, config=config, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# YAML: duplicate keys and aliases (rows 6 and 7)


def test_duplicate_yaml_keys_are_refused_naming_the_key_and_both_lines(tmp_path):
    inline = tmp_path / "inline.yaml"
    inline.write_text("model: {name_or_path: m}\ndata: {source: 'task:reverse'}\nreward: {function: exact_match}\n"
                      "train: {total_steps: 3, total_steps: 500000}\n")
    with pytest.raises(ConfigError, match=r"inline.yaml.*key 'total_steps' is given twice .*line 4, columns 9 and 25"):
        load_config(inline)
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  name_or_path: m\n  dtype: float32\n  dtype: bfloat16\n")
    with pytest.raises(ConfigError, match=r"nested.yaml.*key 'dtype' is given twice .*\(lines 3 and 4\)"):
        load_config(nested)
    # the same key in two different mappings is no duplicate
    assert load_yaml_text("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


@pytest.mark.slow
def test_a_second_train_section_is_one_line_through_the_command_line(tmp_path):
    text = TINY.read_text()
    config = tmp_path / "two_trains.yaml"
    config.write_text(text + "train:\n  total_steps: 500000\n")
    first = text.splitlines().index("train:                    # optimizer and batch sizes, for every algorithm") + 1
    last = len(text.splitlines()) + 1
    out = ppo(tmp_path, config=config)
    assert_one_line(out, "two_trains.yaml", "key 'train' is given twice", f"lines {first} and {last}")


ALIAS_CHAIN = """model: {name_or_path: m}
data: {source: 'task:reverse'}
reward:
  components:
    - function: exact_match
      kwargs:
        a0: &a0 [x, x, x, x, x, x, x, x, x, x]
        a1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]
        a2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]
        a3: &a3 [*a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2]
        a4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3]
        a5: &a5 [*a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4]
        a6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5]
        a7: [*a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6]
"""


def test_yaml_anchors_and_aliases_are_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(ALIAS_CHAIN)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"config file '.*aliases.yaml' line 7: YAML anchors and aliases"):
        load_config(path)
    assert time.monotonic() - started < 5
    # a single alias (no chain) is refused the same way, and in a key=value override too
    path.write_text("model: &m {name_or_path: m}\n")
    with pytest.raises(ConfigError, match=r"aliases.yaml' line 1: YAML anchors"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'lora.target_modules=&t \[c_attn\]' line 1: YAML anchors"):
        load_config(TINY, ["lora.target_modules=&t [c_attn]"])


def test_a_saved_config_reads_back_and_is_no_larger_than_the_settings(tmp_path):
    """save_config writes no aliases (even for values seen twice), so a checkpoint's config.yaml loads again."""
    cfg = load_config(TINY)
    shared = ["x"] * 100
    cfg.reward.components = []
    cfg.lora.target_modules = shared
    cfg.reward.function = "exact_match"
    cfg.env.kwargs = {"a": shared, "b": shared}  # the same list object three times
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "&" not in text and "*id" not in text
    assert load_yaml_text(text, "saved")["env"]["kwargs"]["b"] == shared
    assert len(text) < 20_000


@pytest.mark.slow
def test_an_alias_chain_is_one_line_through_the_command_line(tmp_path):
    config = tmp_path / "aliases.yaml"
    config.write_text(TINY.read_text().replace("reward:\n  function: exact_match\n",
                                               ALIAS_CHAIN.split("\n", 2)[2]))
    started = time.monotonic()
    out = ppo(tmp_path, config=config, timeout=120)
    assert_one_line(out, "aliases.yaml", "YAML anchors and aliases")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# settings refused at load (rows 8 and 9)

NONSENSE = [
    ("run.threads=0", "run.threads is 0: must be at least 1"),
    ("run.threads=-3", "run.threads is -3: must be at least 1"),
    ("data.task.eval_fraction=1.5", "data.task.eval_fraction is 1.5: must be between 0 and 1"),
    ("data.task.eval_fraction=1.0", "data.task.eval_fraction is 1.0: must be between 0 and 1"),
    ("data.task.eval_fraction=-0.5", "data.task.eval_fraction is -0.5: must be between 0 and 1"),
    ("data.task.eval_fraction=0", "data.task.eval_fraction is 0.0: must be between 0 and 1"),
    ("reward.timeout=0", "reward.timeout is 0.0: must be > 0 seconds"),
    ("reward.timeout=-1", "reward.timeout is -1.0: must be > 0 seconds"),
    ("train.warmup_steps=-5", "train.warmup_steps is -5: must be >= 0"),
    ("run.keep_last=0", "run.keep_last is 0: must be at least 1"),
    ("run.keep_last=-1", "run.keep_last is -1: must be at least 1"),
    ("run.save_every=-1", "run.save_every is -1: must be >= 0"),
    # the same hole next to them
    ("run.eval_every=-2", "run.eval_every is -2: must be >= 0"),
    ("run.log_samples=-1", "run.log_samples is -1: must be >= 0"),
    ("run.seed=-1", "run.seed is -1: must be in [0, 2**31)"),
    ("train.weight_decay=-0.1", "train.weight_decay is -0.1: must be >= 0"),
    ("data.max_prompt_length=0", "data.max_prompt_length is 0: must be at least 1"),
    ("data.task.max_per_length=0", "data.task.max_per_length is 0: must be at least 1"),
    ("lora.r=0", "lora.r is 0: must be at least 1"),
    ("lora.dropout=1.0", "lora.dropout is 1.0: must be in [0, 1)"),
]


@pytest.mark.parametrize("override,message", NONSENSE, ids=[o for o, _ in NONSENSE])
def test_nonsense_settings_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value).startswith(message), str(e.value)


def test_nonsense_component_settings_are_refused_at_load():
    for key, value, why in [("timeout", "0", "must be > 0 seconds"), ("timeout", "-1", "must be > 0 seconds"),
                            ("retries", "-1", "must be >= 0"), ("batch_size", "0", "must be at least 1"),
                            ("max_length", "0", "must be at least 1")]:
        components = f"reward.components=[{{function: exact_match}}, {{function: exact_match, {key}: {value}}}]"
        with pytest.raises(ConfigError, match=rf"^reward.components\[1\].{key} is {value}(\.0)?: {why}"):
            load_config(TINY, ["reward.function=", components])


def test_reward_training_threads_are_checked_too(tmp_path):
    from llmrl.config import RewardTrainConfig

    path = tmp_path / "rm.yaml"
    path.write_text("model: m\ndata: d.jsonl\nthreads: 0\n")
    with pytest.raises(ConfigError, match=r"^threads is 0: must be at least 1"):
        load_config(path, cls=RewardTrainConfig)


@pytest.mark.slow
def test_zero_threads_is_one_line_through_the_command_line(tmp_path):
    """It was RuntimeError: set_num_threads, a traceback."""
    out = ppo(tmp_path, "run.threads=0")
    assert_one_line(out, "run.threads is 0: must be at least 1")
    out = ppo(tmp_path, "run.threads=2", "data.task.eval_fraction=-0.5")
    assert_one_line(out, "data.task.eval_fraction is -0.5")  # it blamed data.eval_source


# ----------------------------------------------------------------------------------------------
# a missing column value is None, and the built-in rewards treat None as "does not apply" (row 7)


def test_a_missing_answer_reaches_the_reward_as_none_and_is_not_compared_with_the_text_none(tmp_path):
    from llmrl.rewards.base import build_reward
    from reward_models.rules import exact_match, numeric_match

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "ab>", "answer": "ba"}) + "\n" + json.dumps({"prompt": "cd>"}) + "\n"
                    + "".join(json.dumps({"prompt": f"q{i}>", "answer": "x"}) + "\n" for i in range(4)))
    train, evals = load_prompts(DataConfig(source=str(data), eval_size=2))
    by_prompt = {r["prompt"]: r for r in train + evals}  # held out by hash: either may be in either split
    assert by_prompt["cd>"]["answer"] is None  # not the text "None"
    answers = [by_prompt["ab>"]["answer"], by_prompt["cd>"]["answer"]]
    assert exact_match(["ab>", "cd>"], ["ba", "None"], answer=answers) == [1.0, None]
    assert numeric_match(["q", "q"], ["4", "None"], answer=[4, None]) == [1.0, None]
    # through the run's reward: a completion "None" for a row without an answer is never scored as a match
    skip = build_reward(RewardConfig(function="exact_match", on_error="skip"))
    result = skip(["ab>", "cd>"], ["ba", "None"], answer=answers)
    assert result.valid == [True, False] and result.scores[0] == 1.0
    assert result.metrics["reward/exact_match/none_rate"] == 0.5
    strict = build_reward(RewardConfig(function="exact_match"))
    with pytest.raises(RewardError, match=r"no reward applies to sample 1"):
        strict(["ab>", "cd>"], ["ba", "None"], answer=answers)


# ----------------------------------------------------------------------------------------------
# prompts: whitespace-only and NUL refused naming the row; size bounded before tokenising (rows 6 and 9)


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))
    return path


@pytest.mark.parametrize("bad,message", [
    ("   \t\n", r"prompt 3 is only whitespace \('   \\t\\n'\)"),
    ("ab\x00c>", r"prompt 3 contains a NUL character \(\\x00\) at position 2"),
    ([{"role": "user", "content": "  "}], r"prompt 3 has only empty or whitespace messages"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a\x00"}],
     r"prompt 3 message 1 contains a NUL character"),
], ids=["whitespace", "nul", "blank-conversation", "nul-in-a-message"])
def test_whitespace_and_nul_prompts_are_refused_naming_the_row(tmp_path, bad, message):
    data = write_prompts(tmp_path / "p.jsonl", ["ab>", "cd>", "ef>", bad, "fa>", "ba>"])
    with pytest.raises(ConfigError, match=rf"^data.source: {message}.*\(row 3 of '.*p.jsonl', counting from 0\)"):
        load_prompts(DataConfig(source=str(data), eval_size=2))
    # a bad row among the held-out tail is named by its row in the file, as data.source
    tail = write_prompts(tmp_path / "tail.jsonl", ["ab>", "cd>", "ef>", "fa>", bad, "ba>"])
    with pytest.raises(ConfigError, match=r"^data.source: prompt 4 .*\(row 4 of '.*tail.jsonl'"):
        load_prompts(DataConfig(source=str(tail), eval_size=2))


@pytest.mark.slow
def test_a_whitespace_prompt_is_one_line_through_the_command_line(tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", ["ab>"] * 20 + ["  "] + ["cd>"] * 20)
    out = ppo(tmp_path, f"data.source={data}")
    assert_one_line(out, "data.source: prompt 20 is only whitespace", "p.jsonl")


def test_a_megabyte_prompt_is_refused_before_it_is_tokenised(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "ab>"}, {"prompt": "a" * 10_000_000}]
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^data.source: prompt 1 has 10,000,000 characters, far more than 16 tokens"):
        check_prompt_lengths(rows, "prompt", tok, max_prompt_length=16, max_new_tokens=4, context=32)
    assert time.monotonic() - started < 2  # tokenising it took ~25 s with this tokenizer, minutes with a BPE


# ----------------------------------------------------------------------------------------------
# a 10 MB observation from an environment (row 6)

HUGE_ENV = '''
class Env:
    """Answers every action with 10 MB of text (or starts with it, given start_huge)."""

    def __init__(self, start_huge=False):
        self.start_huge = start_huge

    def reset(self, seed=None, options=None):
        return ("a" * 10_000_000 if self.start_huge else "abc>"), {}

    def step(self, action):
        return "b" * 10_000_000, 0.0, False, False, {}
'''


def play(env, cfg: EnvConfig, tiny_model_dir, skip=False):
    from transformers import AutoTokenizer

    from llmrl.rollout.episodes import TurnRenderer, play_episodes

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = tok.convert_tokens_to_ids("a")
    return play_episodes([env], [(7, None)], lambda contexts, n: [[a, a] for _ in contexts], tok,
                         TurnRenderer(tok, cfg), cfg, 4, "huge.py:Env", skip_errors=skip)


def test_a_ten_megabyte_observation_ends_the_episode_naming_env_seed_and_turn(tmp_path, tiny_model_dir):
    (tmp_path / "huge.py").write_text(HUGE_ENV)
    sys.path.insert(0, str(tmp_path))
    try:
        import huge
    finally:
        sys.path.remove(str(tmp_path))
    cfg = EnvConfig(name="huge.py:Env", max_turns=3, max_episode_tokens=16, chat="off")
    started = time.monotonic()
    with pytest.raises(EnvError, match=r"^env 'huge.py:Env', episode seed 7, turn 1: step returned an observation "
                                       r"of 10,000,000 characters, more than 65,536"):
        play(huge.Env(), cfg, tiny_model_dir)
    with pytest.raises(EnvError, match=r"^env 'huge.py:Env', episode seed 7: reset returned an observation of "
                                       r"10,000,000 characters"):
        play(huge.Env(start_huge=True), cfg, tiny_model_dir)
    # reward.on_error: skip drops the episode, as for any environment error
    (episode,) = play(huge.Env(), cfg, tiny_model_dir, skip=True)
    assert episode.reason == "env_error" and "10,000,000 characters" in episode.error
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_a_ten_megabyte_observation_is_one_line_through_the_command_line(tmp_path, tiny_model_dir):
    (tmp_path / "huge.py").write_text(HUGE_ENV)
    started = time.monotonic()
    out = subprocess.run(ppo_command([*SMALL, f"model.name_or_path={tiny_model_dir}",
                                      f"run.output_dir={tmp_path / 'run'}", f"env.name={tmp_path / 'huge.py'}:Env",
                                      "reward.function=", "data.source=", "env.max_episode_tokens=16",
                                      "generation.max_new_tokens=4", "env.max_turns=2"], ranks=0),
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=subprocess_env())
    assert_one_line(out, "huge.py:Env'", "episode seed", "turn 1", "step returned an observation of 10,000,000 "
                                                                  "characters")
    assert time.monotonic() - started < 120
