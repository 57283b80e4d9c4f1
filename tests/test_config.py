"""Config loading: every shipped YAML loads; bad keys, types and sizes fail with a message that says how to fix."""
import re
from pathlib import Path

import pytest
import yaml

from llmrl.config import Config, ConfigError, RewardTrainConfig, help_text, load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in SHIPPED}
    assert {"tiny.yaml", "gpt2.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    if path.name.startswith("reward_"):  # reward-model training recipes (launch/train_reward.py)
        assert isinstance(load_config(path, cls=RewardTrainConfig), RewardTrainConfig)
        return
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    sizes = cfg.sizes(1)
    assert sizes.num_mini_batches * cfg.train.mini_batch_size == cfg.train.rollout_batch_size


def write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base(**sections):
    data = {"model": {"name_or_path": "x"}, "data": {"source": "task:reverse"},
            "reward": {"function": "reward_models.rules:exact_match"}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return data


def test_unknown_key_names_its_path_and_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'ppo.learning_rat'"):
        load_config(write(tmp_path, base(ppo={"learning_rat": 1e-3})))
    with pytest.raises(ConfigError, match=r"'ppo.clip_rnage'.*did you mean 'ppo.clip_range'"):
        load_config(write(tmp_path, base(ppo={"clip_rnage": 0.1})))
    with pytest.raises(ConfigError, match=r"'genration'.*did you mean 'generation'"):
        load_config(write(tmp_path, {**base(), "genration": {}}))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train.total_steps must be a int, got 'ten' \(str\)"):
        load_config(write(tmp_path, base(train={"total_steps": "ten"})))
    with pytest.raises(ConfigError, match=r"ppo.adaptive_kl must be a bool, got 1"):
        load_config(write(tmp_path, base(ppo={"adaptive_kl": 1})))


def test_ints_are_accepted_for_floats_and_scientific_notation_parses(tmp_path):
    cfg = load_config(write(tmp_path, base(train={"lr": 1})), ["ppo.init_kl_coef=2e-3"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.ppo.init_kl_coef == pytest.approx(0.002)
    path = tmp_path / "sci.yaml"
    path.write_text(yaml.safe_dump(base()) + "train:\n  lr: 3e-5\n")
    assert load_config(path).train.lr == pytest.approx(3e-5)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_batch_sizes_that_do_not_divide_name_both_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"train.rollout_batch_size = 64 is not divisible by train.mini_batch_size = 24"):
        load_config(write(tmp_path, base(train={"rollout_batch_size": 64, "mini_batch_size": 24})))
    with pytest.raises(ConfigError, match=r"= 16 is not divisible by train.micro_batch_size = 6"):
        load_config(write(tmp_path, base(train={"mini_batch_size": 16, "micro_batch_size": 6})))
    cfg = load_config(write(tmp_path, base(train={"rollout_batch_size": 64, "mini_batch_size": 16,
                                                  "micro_batch_size": 4})))
    s = cfg.sizes(2)
    assert (s.local_rollout_batch_size, s.num_mini_batches, s.grad_accum_steps) == (32, 4, 2)
    with pytest.raises(ConfigError, match=r"rollout_batch_size = 64 is not divisible by the world size = 3"):
        cfg.sizes(3)


def test_overrides_set_single_keys_and_are_checked(tmp_path):
    path = write(tmp_path, base())
    cfg = load_config(path, ["train.total_steps=7", "lora.target_modules=[c_attn, c_fc]", "model.quantization=null"])
    assert cfg.train.total_steps == 7
    assert cfg.lora.target_modules == ["c_attn", "c_fc"]
    assert cfg.model.quantization is None
    with pytest.raises(ConfigError, match="unknown config key 'ppo.totl_steps'"):
        load_config(path, ["ppo.totl_steps=3"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["train.total_steps"])


@pytest.mark.parametrize("section,key,value,match", [
    ("model", "dtype", "fp8", "model.dtype is 'fp8'"),
    ("model", "quantization", "3bit", "model.quantization is '3bit'"),
    ("ppo", "kl_estimator", "k9", "ppo.kl_estimator is 'k9'"),
    ("generation", "temperature", 0.0, "generation.temperature is 0.0"),
    ("train", "micro_batch_size", 0, "train.micro_batch_size is 0"),
    # each of these crashed deep in torch, or trained on silently
    ("generation", "top_k", -5, "generation.top_k is -5: must be >= 0"),
    ("generation", "min_p", 1.0, r"generation.min_p is 1.0: must be in \[0, 1\)"),
    ("generation", "repetition_penalty", 0.0, "generation.repetition_penalty is 0.0: must be > 0"),
    ("generation", "stop", [""], r"generation.stop is \[''\]: list non-empty strings"),
    ("train", "lr", -1.0, "train.lr is -1.0: must be > 0"),
    ("ppo", "clip_range", -0.2, "ppo.clip_range is -0.2: must be > 0"),
    ("train", "max_grad_norm", -1.0, "train.max_grad_norm is -1.0"),
    ("ppo", "gamma", 2.0, r"ppo.gamma is 2.0: must be in \(0, 1\]"),
    ("dpo", "batch_size", 0, "dpo.batch_size is 0: must be at least 1"),
    ("train", "total_steps", 0, "train.total_steps is 0: must be at least 1"),
    # hardening audit: these passed validation and trained on with NaN, hung, or crashed later
    ("ppo", "vf_coef", float("nan"), "ppo.vf_coef is nan: must be a finite number"),
    ("ppo", "kl_target", float("nan"), "ppo.kl_target is nan: must be a finite number"),
    ("train", "lr", float("inf"), "train.lr is inf: must be a finite number"),
    ("ppo", "kl_horizon", 0.0, "ppo.kl_horizon is 0.0: must be > 0"),
    ("run", "device", "tpu", "run.device is 'tpu': use auto, cpu, cuda or cuda:N"),
    ("reward", "clip", -1.0, r"reward.clip is -1.0: must be > 0 \(scores are clipped to \[-clip, clip\]\)"),
    ("reward", "clip", 0.0, "reward.clip is 0.0: must be > 0"),
])
def test_invalid_values(tmp_path, section, key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, base(**{section: {key: value}})))


def test_a_component_float_and_a_huge_task_are_refused(tmp_path):
    data = base(reward={"components": [{"function": "exact_match", "weight": float("nan")}]})
    with pytest.raises(ConfigError, match=r"reward.components\[0\].weight is nan: must be a finite number"):
        load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match=r"data.task.max_len is 100: the task would enumerate more than 10\^7"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.task.max_len=100"])
    with pytest.raises(ConfigError, match=r"override 'reward.function=:': the value is not valid YAML"):
        load_config(REPO / "configs" / "tiny.yaml", ["reward.function=:"])


@pytest.mark.parametrize("cls", [Config, RewardTrainConfig])
def test_every_field_has_help(cls):
    rows = help_text(cls)
    assert len(rows) > 10
    missing = [key for key, _, text in rows if not text.strip()]
    assert missing == []


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_shipped_deepspeed_configs_agree_with_their_stage(path):
    import json

    from llmrl.distributed.strategy import check_config_file

    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"deepspeed.config_file={path}", f"deepspeed.zero_stage={stage}"])
    check_config_file(cfg.deepspeed)
    other = 3 if stage != 3 else 2
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"deepspeed.config_file={path}", f"deepspeed.zero_stage={other}"])
    with pytest.raises(ConfigError, match=f"sets ZeRO stage {stage} but deepspeed.zero_stage is {other}"):
        check_config_file(cfg.deepspeed)


@pytest.mark.parametrize("override,message", [
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage is 5: use 0, 1, 2, 3 or null"),  # null: the JSON's, else 2
    ("deepspeed.zero_stage=true", "deepspeed.zero_stage is True: use 0, 1, 2, 3 or null"),  # True == 1 in Python
    ("model.quantization=16bit", "model.quantization is '16bit': use 8bit, 4bit or null"),
    ("critic_free.scale=std", "critic_free.scale is 'std': use group, batch or none"),
    ("generation.engine=vlm", "generation.engine is 'vlm': use fast, generate or vllm"),
    ("reward.on_error=ignore", "reward.on_error is 'ignore': use raise or skip"),
])
def test_choices_are_checked_once_at_load_from_their_literal_type(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert load_config(REPO / "configs" / "tiny.yaml", ["deepspeed.zero_stage=3"]).deepspeed.zero_stage == 3


def test_the_config_reference_lists_the_choices():
    rows = {key: text for key, _, text in help_text()}
    assert rows["deepspeed.zero_stage"].endswith("One of: `0`, `1`, `2`, `3`.")
    assert rows["model.quantization"].endswith("One of: `8bit`, `4bit`.")


@pytest.mark.parametrize("old,new", [("ppo.lr", "train.lr"), ("ppo.ppo_epochs", "train.epochs"),
                                     ("ppo.rollout_batch_size", "train.rollout_batch_size"),
                                     ("dpo.steps", "train.total_steps")])
def test_a_key_that_moved_to_train_names_its_new_place(tmp_path, old, new):
    section, key = old.split(".")
    message = rf"^{re.escape(old)} is now {re.escape(new)} \(the optimizer and batch sizes"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, base(**{section: {key: 2}})))
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, base()), [f"{old}=2"])


def test_a_checkpoint_config_written_before_the_train_section_is_upgraded():
    from llmrl.config import Config, from_dict, upgrade_saved_config

    old = {"algorithm": "ppo", "ppo": {"lr": 3e-4, "ppo_epochs": 2, "total_steps": 9, "gamma": 0.9},
           "dpo": {"steps": 150, "beta": 0.2}}
    cfg = from_dict(Config, upgrade_saved_config(old))
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.total_steps, cfg.ppo.gamma, cfg.dpo.beta) == (3e-4, 2, 9, 0.9, 0.2)
    dpo = from_dict(Config, upgrade_saved_config({**old, "algorithm": "dpo"}))
    assert dpo.train.total_steps == 150  # a DPO run's length was dpo.steps
    assert old["ppo"]["lr"] == 3e-4 and "steps" in old["dpo"]  # the caller's dict is left as it was


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("3E5", 3e5), ("-2.5e+3", -2500.0), (".5e1", 5.0)])
def test_numbers_without_a_dot_read_the_same_from_a_file_and_an_override(tmp_path, text, value):
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump(base()) + f"ppo:\n  init_kl_coef: {text}\n")
    assert load_config(path).ppo.init_kl_coef == value
    assert load_config(write(tmp_path, base()), [f"ppo.init_kl_coef={text}"]).ppo.init_kl_coef == value


def test_a_string_setting_that_looks_like_a_number_stays_a_string(tmp_path):
    # run.output_dir is a str: 1e5 is a folder name there, not 100000.0 (the old float pass refused it)
    assert load_config(write(tmp_path, base()), ["run.output_dir=1e5"]).run.output_dir == "1e5"
    with pytest.raises(ConfigError, match=r"ppo.init_kl_coef must be a float, got 'inf'"):
        load_config(write(tmp_path, base()), ["ppo.init_kl_coef=inf"])


def test_resume_export_and_eval_read_a_checkpoint_config_of_the_old_layout(tmp_path):
    """A run trained before the train: section: its config.yaml still resumes (no setting reported changed) and
    loads for export; a user's config in the old layout is refused by name."""
    from llmrl.config import MOVED_KEYS, to_dict
    from llmrl.distributed.run_dir import resume_changes
    from llmrl.exporter import load_checkpoint_config

    cfg = load_config(write(tmp_path, base(train={"lr": 3e-4, "epochs": 2})))
    data = to_dict(cfg)
    for old, new in MOVED_KEYS.items():  # write it back the way the old llmrl did
        (os_, ok), (ns, nk) = old.split("."), new.split(".")
        data[os_][ok] = data[ns][nk]
    del data["train"]
    checkpoint = tmp_path / "final"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_config.json").write_text("{}")
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(data))
    assert resume_changes(checkpoint, cfg) == {}
    assert load_checkpoint_config(checkpoint) == cfg
    assert load_config(checkpoint / "config.yaml", saved=True) == cfg
    with pytest.raises(ConfigError, match=r"^(ppo|dpo)\.\w+ is now train\.\w+ "):
        load_config(checkpoint / "config.yaml")


@pytest.mark.parametrize("override,llmrl_key", [
    ("train.num_iterations=2", "train.epochs"),
    ("critic_free.beta=0.1", "critic_free.kl_coef"),
    ("generation.max_completion_length=64", "generation.max_new_tokens"),
    ("num_generations=8", "critic_free.num_generations"),
    ("train.learning_rate=1e-5", "train.lr"),
    ("critic_free.loss_type=dr_grpo", "train.loss_aggregation"),
    ("critic_free.scale_rewards=batch", "critic_free.scale"),
    ("train.max_prompt_length=512", "data.max_prompt_length"),
    ("critic_free.missing_eos_penalty=1.0", "generation.missing_eos_penalty"),
    ("train.temperature=0.7", "generation.temperature"),
    ("epsilon=0.2", "ppo.clip_range"),
    ("critic_free.epsilon_high=0.28", "critic_free.clip_range_high"),
])
def test_a_trl_name_is_answered_with_llmrls_key(override, llmrl_key):
    with pytest.raises(ConfigError, match=rf"is TRL's name; llmrl's is {re.escape(llmrl_key)}"):
        load_config(REPO / "configs" / "tiny.yaml", [override])


@pytest.mark.parametrize("name", ["mask_truncated_completions", "top_entropy_quantile"])
def test_a_trl_name_without_an_llmrl_equivalent_says_so(name):
    with pytest.raises(ConfigError, match=rf"^unknown config key 'train.{name}': '{name}' is TRL's name; llmrl has "
                                          rf"none: .*\(docs/trl.md lists the others\)$"):
        load_config(REPO / "configs" / "tiny.yaml", [f"train.{name}=true"])


def test_every_trl_name_in_the_docs_table_is_answered_with_llmrls_key():
    # the names of docs/trl.md's defaults table (first column, in backticks): each one has its line in TRL_NAMES
    from llmrl.config import TRL_NAMES

    text = (REPO / "docs" / "trl.md").read_text()
    table = text[text.index("## Defaults"):]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = {n for line in rows for n in re.findall(r"`(\w+)`", line.split("|")[1])}
    assert {"beta", "num_iterations", "max_completion_length", "max_prompt_length", "num_generations", "loss_type",
            "scale_rewards", "missing_eos_penalty", "temperature", "learning_rate", "epsilon", "epsilon_high",
            "mask_truncated_completions", "top_entropy_quantile"} <= names
    assert names - set(TRL_NAMES) == set()


def test_llmrl_version():
    import contextlib
    import io

    from llmrl import __version__
    from llmrl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--version"]) == 0
    assert out.getvalue().strip() == f"llmrl {__version__}"


def test_a_checkpoint_written_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """Its config.yaml lacks the keys added since (the run ran as their defaults do): no change at the default,
    a refused change at another value."""
    from llmrl.config import to_dict
    from llmrl.distributed.run_dir import resume_changes

    cfg = load_config(write(tmp_path, base()))
    data = to_dict(cfg)
    for section, key in (("train", "loss_aggregation"), ("critic_free", "sapo_tau_neg"),
                         ("run", "stop_grace_seconds"), ("train", "old_logprobs"), ("train", "importance_sampling"),
                         ("train", "importance_sampling_cap"), ("ppo", "critic")):
        del data[section][key]
    checkpoint = tmp_path / "final"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(data))
    assert resume_changes(checkpoint, cfg) == {}
    changed = load_config(write(tmp_path, base(train={"loss_aggregation": "sequence_mean"})))
    with pytest.raises(ConfigError, match=r"train\.loss_aggregation None -> 'sequence_mean'"):
        resume_changes(checkpoint, changed)


@pytest.mark.parametrize("overrides,fragments", [
    (["train.importance_sampling_cap=0.5"], ["train.importance_sampling_cap is 0.5", ">= 1"]),
    (["train.importance_sampling_cap=.inf"], ["train.importance_sampling_cap is inf"]),
    (["train.importance_sampling_cap=.nan"], ["train.importance_sampling_cap is nan"]),
    (["train.importance_sampling=true", "train.old_logprobs=sampler"], ["train.importance_sampling", "recompute"]),
    (["train.importance_sampling=true", "generation.engine=generate"], ["generation.engine = generate"]),
    (["train.old_logprobs=trainer"], ["train.old_logprobs", "recompute"]),
])
def test_sampler_settings_that_cannot_work_are_one_line(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", overrides)
    assert "\n" not in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_where_pi_old_comes_from_by_default():
    """auto: the sampler's log-probs only where they are the trainer's (float32, eager fast engine, full-precision
    base); truncated importance sampling on by default with vLLM only."""
    from llmrl.trainers.online import importance_sampling_cap, sampler_is_exact

    def cfg(*overrides):
        return load_config(REPO / "configs" / "tiny.yaml", list(overrides))

    assert sampler_is_exact(cfg())
    for other in (["model.dtype=bfloat16"], ["model.dtype=float16"], ["generation.compile=true"],
                  ["generation.engine=vllm"], ["generation.engine=generate"]):
        assert not sampler_is_exact(cfg(*other)), other
    assert not sampler_is_exact(cfg("model.quantization=4bit"))
    assert importance_sampling_cap(cfg("generation.engine=vllm")) == 2.0
    assert importance_sampling_cap(cfg("generation.engine=vllm", "train.importance_sampling_cap=3")) == 3.0
    assert importance_sampling_cap(cfg("generation.engine=vllm", "train.importance_sampling=false")) is None
    assert importance_sampling_cap(cfg()) is None
    assert importance_sampling_cap(cfg("train.importance_sampling=true")) == 2.0


# ------------------------------------------------------------------------------------------------------------------
# Relative paths: in a config file, from the file's folder; in an override, from the working directory.


def recipe_in_a_subfolder(tmp_path, tiny_model_dir) -> Path:
    """project/recipes/r.yaml naming, relative to recipes/: a model folder, prompt and preference files, a reward
    file, a DeepSpeed JSON; a hub name and run.output_dir stay as written."""
    import shutil

    recipes = tmp_path / "project" / "recipes"
    (recipes / "data").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, recipes / "model")
    (recipes / "data" / "p.jsonl").write_text('{"prompt": "abc"}\n{"prompt": "cab"}\n')
    (recipes / "data" / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (recipes / "data" / "labels.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    (recipes / "score.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    (recipes / "ds.json").write_text("{}\n")
    path = recipes / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": "model", "tokenizer": "gpt2"},
        "data": {"source": "data/p.jsonl", "eval_source": "data/p.jsonl", "eval_size": 1},
        "dpo": {"data": "data/prefs.jsonl"},
        "kto": {"data": "data/labels.jsonl"},
        "reward": {"components": [{"function": "score.py:score"}, {"function": "exact_match"},
                                  {"function": "reward_models.rules:keywords"}]},
        "deepspeed": {"config_file": "ds.json"},
        "run": {"output_dir": "runs/r"}}))
    return path


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tmp_path, tiny_model_dir, monkeypatch):
    from llmrl.data.prompts import load_prompts
    from llmrl.rewards.base import build_reward

    recipe = recipe_in_a_subfolder(tmp_path, tiny_model_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "project" / "recipes" / "r.yaml")
    recipes = Path("../project/recipes")
    assert Path(cfg.model.name_or_path) == recipes / "model"
    assert Path(cfg.data.source) == Path(cfg.data.eval_source) == recipes / "data" / "p.jsonl"
    assert Path(cfg.dpo.data) == recipes / "data" / "prefs.jsonl"
    assert Path(cfg.kto.data) == recipes / "data" / "labels.jsonl"
    assert Path(cfg.deepspeed.config_file) == recipes / "ds.json"
    assert cfg.reward.components[0].function == str(recipes / "score.py") + ":score"
    # not paths: a hub name, a built-in rule, a module; and the run folder is the working directory's
    assert cfg.model.tokenizer == "gpt2"
    assert [c.function for c in cfg.reward.components[1:]] == ["exact_match", "reward_models.rules:keywords"]
    assert cfg.run.output_dir == "runs/r"
    # and they load from here
    train_rows, eval_rows = load_prompts(cfg.data)
    assert [r["prompt"] for r in train_rows] == ["abc", "cab"] and eval_rows[0]["prompt"] in ("abc", "cab")
    assert build_reward(cfg.reward, "cpu").components[0].name  # the reward file was imported
    assert (Path(cfg.model.name_or_path) / "config.json").is_file()


def test_a_relative_path_in_an_override_is_read_from_the_working_directory(tmp_path, tiny_model_dir, monkeypatch):
    recipe = recipe_in_a_subfolder(tmp_path, tiny_model_dir)
    (tmp_path / "mine.jsonl").write_text('{"prompt": "fed"}\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe.relative_to(tmp_path), ["data.source=mine.jsonl", "dpo.data=mine.jsonl"])
    assert cfg.data.source == cfg.dpo.data == "mine.jsonl"
    assert Path(cfg.data.eval_source) == Path("project/recipes/data/p.jsonl")  # the file's own, from its folder


def test_a_path_written_from_the_working_directory_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "p.jsonl").write_text('{"prompt": "abc"}\n')
    (tmp_path / "configs" / "r.yaml").write_text(yaml.safe_dump(base(data={"source": "configs/data/p.jsonl"})))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("configs/r.yaml")
    assert "\n" not in str(e.value)
    assert "data.source = 'configs/data/p.jsonl'" in str(e.value) and "'data/p.jsonl'" in str(e.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_finds_its_files_from_any_folder(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cls = RewardTrainConfig if path.name.startswith("reward_") else Config
    cfg = load_config(path, cls=cls)
    files = [cfg.data] if cls is RewardTrainConfig else \
        [cfg.data.source, cfg.data.eval_source or "", cfg.dpo.data, cfg.kto.data, cfg.deepspeed.config_file or ""]
    for f in files:
        if f.endswith(".jsonl") and path.name != "llama7b_8bit_zero2.yaml":  # that one names the user's prompts
            assert Path(f).is_file(), f
