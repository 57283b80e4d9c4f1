"""The search space of llmrl tune / llmrl pbt: parsed, checked against the recipe (one line per problem, before any
trial), and turned into Optuna suggestions and command-line overrides."""
import optuna
import pytest

from llmrl.errors import ConfigError
from llmrl.tune.space import Param, load_space, overrides

RECIPE = {"model": {"name_or_path": "sshleifer/tiny-gpt2"}, "data": {"source": "task:reverse"},
          "reward": {"function": "exact_match"}, "train": {"total_steps": 4, "rollout_batch_size": 24, "mini_batch_size": 24, "micro_batch_size": 24},
          "critic_free": {"num_generations": 4}, "algorithm": "grpo"}
LR = {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True}


def test_three_kinds_parse_into_params():
    params = load_space({"train.lr": LR, "critic_free.num_generations": {"type": "int", "low": 2, "high": 8,
                                                                          "step": 2},
                         "generation.temperature": {"type": "categorical", "choices": [0.7, 1.0]}}, RECIPE)
    assert params == [Param("train.lr", "float", 1e-5, 1e-2, log=True),
                      Param("critic_free.num_generations", "int", 2, 8, step=2),
                      Param("generation.temperature", "categorical", choices=(0.7, 1.0))]


@pytest.mark.parametrize("space, expected", [
    ({"train.lrr": LR}, "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ({"train.lr": {**LR, "low": 1e-2, "high": 1e-5}}, "an inverted range"),
    ({"train.lr": {**LR, "low": 1e-3, "high": 1e-3}}, "an empty range"),
    ({"generation.temperature": {"type": "categorical", "choices": [1.0]}}, "two values or more"),
    ({"generation.temperature": {"type": "categorical", "choices": [1.0, 1.0]}}, "name a value twice"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "must stay above 0"),
    ({"train.lr": {"type": "float", "low": -1.0, "high": 1e-2}}, "train.lr = -1.0 is refused by the recipe"),
    ({"train.total_steps": {"type": "float", "low": 1.5, "high": 3}}, "must be a int, got 1.5"),
    ({"train.total_steps": {"type": "int", "low": 1.5, "high": 3}}, "needs whole numbers"),
    # 5 does not divide the rollout of 24: every value of a short int range is tried against the recipe
    ({"critic_free.num_generations": {"type": "int", "low": 3, "high": 6}}, "num_generations = 5"),
    ({"train.lr": {"type": "uniform", "low": 0, "high": 1}}, "type 'uniform' is not one of"),
    ({"train.lr": {"type": "float", "low": 1e-5}}, "high is missing"),
    ({"train.lr": {**LR, "lg": True}}, "'lg' is not a setting of a float range"),
    ({"train.lr": 1e-3}, "give its range as a mapping"),
    ({}, "holds nothing"),
])
def test_bad_space_is_one_line_naming_the_key(space, expected):
    with pytest.raises(ConfigError) as err:
        load_space(space, RECIPE)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_space_file_that_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "space.yaml").write_text("train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}\n")
    assert load_space(tmp_path / "space.yaml", RECIPE)[0].log is True


def test_suggestions_stay_in_range_and_become_overrides():
    params = load_space({"train.lr": LR, "critic_free.num_generations": {"type": "int", "low": 2, "high": 8,
                                                                          "step": 2},
                         "run.log_samples": {"type": "categorical", "choices": [0, 3]}}, RECIPE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = {p.key: p.suggest(trial) for p in params}
        assert all(p.contains(values[p.key]) for p in params)
        assert values["critic_free.num_generations"] in (2, 4, 6, 8)
        study.tell(trial, 0.0)
    assert overrides({"train.lr": 1e-05, "generation.stop": None, "model.name_or_path": "a b"}) == \
        ["train.lr=1e-05", "generation.stop=null", 'model.name_or_path="a b"']


@pytest.mark.parametrize("recipe, space", [("tiny", "tiny_space"), ("smollm2", "smollm2_space")])
def test_shipped_spaces_fit_their_recipes(recipe, space):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    params = load_space(configs / "tune" / f"{space}.yaml", configs / f"{recipe}.yaml")
    assert {p.key for p in params} == {"train.lr", "ppo.init_kl_coef"} and all(p.log for p in params)


def test_a_key_the_algorithm_does_not_read_is_refused():
    """GRPO's KL weight is critic_free.kl_coef: a search over ppo.init_kl_coef would run the same trial again and
    again. Judged at the top of the range, so a recipe with the KL term off (0) may still search its weight."""
    kl = {"type": "float", "low": 0.0, "high": 0.1}
    with pytest.raises(ConfigError, match="ppo.init_kl_coef is not used by algorithm grpo"):
        load_space({"ppo.init_kl_coef": kl}, RECIPE)
    with pytest.raises(ConfigError, match="critic_free.kl_coef is not used by algorithm ppo"):
        load_space({"critic_free.kl_coef": kl}, {**RECIPE, "algorithm": "ppo"})
    assert load_space({"critic_free.kl_coef": kl}, RECIPE, ["critic_free.kl_coef=0"])[0].high == 0.1
    both = {"ppo.init_kl_coef": kl, "algorithm": {"type": "categorical", "choices": ["ppo", "grpo"]}}
    assert len(load_space(both, RECIPE)) == 2  # the algorithm varies too: each key is read by one of them
