"""A search space: which config keys a search (``llmrl tune``) or a population (``llmrl pbt``) varies, and over what.

A space is a YAML mapping (or a dict) from dotted config keys to their ranges, Optuna's three kinds::

    train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    ppo.init_kl_coef: {type: float, low: 0.001, high: 0.5, log: true}
    critic_free.num_generations: {type: int, low: 2, high: 8, step: 2}
    generation.temperature: {type: categorical, choices: [0.7, 1.0, 1.3]}

``load_space`` checks it against the recipe before any trial starts: every key must be a key of the config (the
config's own error, with the closest name), each bound and choice must be a value the config accepts, and a range
must be a range (low < high, log ranges above 0, a categorical with two values or more). Each problem is one line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrl.errors import ConfigError

KINDS = ("float", "int", "categorical")
EXAMPLE = "e.g. train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}"


@dataclass(frozen=True)
class Param:
    """One dimension of a space: the config key and its range (``float``/``int``: low..high, optionally log or
    with a step; ``categorical``: the choices)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = field(default_factory=tuple)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        scale = ", log" if self.log else (f", step {self.step}" if self.step is not None else "")
        return f"{self.key} {self.kind} in [{self.low}, {self.high}{scale}]"

    def suggest(self, trial) -> Any:
        """This parameter's value for an Optuna ``trial``."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


def overrides(values: dict[str, Any]) -> list[str]:
    """``section.key=value`` strings (the command line's overrides) for ``{key: value}``; values written as JSON,
    which the override parser reads as YAML, so 1e-05, true, null and strings come back as they were."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _number(value: Any, what: str, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{what} is {value!r}: give a finite number")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{what} is {value!r}: an int range needs whole numbers")
    return int(value) if integer else float(value)


def _param(key: str, spec: Any, where: str) -> Param:
    what = f"{where}: {key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{what} is {spec!r}: give its range as a mapping, {EXAMPLE}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{what}: type {kind!r} is not one of {', '.join(KINDS)}; {EXAMPLE}")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{what}: {', '.join(map(repr, unknown))} is not a setting of a {kind} range "
                          f"(it takes {', '.join(sorted(allowed - {'type'}))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise ConfigError(f"{what}: choices is {choices!r}: a categorical needs a list of two values or more "
                              f"(with one value, set the key in the recipe instead)")
        if any(isinstance(c, (dict, list)) for c in choices):
            raise ConfigError(f"{what}: choices {choices!r} hold a list or mapping: Optuna stores only numbers, "
                              f"strings, booleans and null")
        if len({json.dumps(c, sort_keys=True) for c in choices}) < len(choices):
            raise ConfigError(f"{what}: choices {choices!r} name a value twice: list each once")
        return Param(key, kind, choices=tuple(choices))
    integer = kind == "int"
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"{what}: {bound} is missing; {EXAMPLE}")
    low, high = _number(spec["low"], f"{what} low", integer), _number(spec["high"], f"{what} high", integer)
    if not low < high:
        raise ConfigError(f"{what}: low {low} is not below high {high}: "
                          f"{'an empty' if low == high else 'an inverted'} range (for one value, set the key in the "
                          f"recipe instead)")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{what}: log is {log!r}: give true or false")
    if log and low <= 0:
        raise ConfigError(f"{what}: low {low} with log: true: a log range must stay above 0")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{what} step", integer)
        if step <= 0 or log:
            raise ConfigError(f"{what}: step {step} " + ("cannot go with log: true (Optuna takes one or the other)"
                                                         if log else "must be > 0"))
        if step > high - low:
            raise ConfigError(f"{what}: step {step} is wider than the range [{low}, {high}]")
    return Param(key, kind, low, high, log, step)


def read_space(space: str | Path | dict) -> tuple[dict, str]:
    """(the space's mapping, a name for it in messages) from a YAML path or a dict."""
    if isinstance(space, dict):
        return space, "space"
    from llmrl.config import load_yaml_text

    path = Path(space)
    try:
        data = load_yaml_text(path.read_text(), f"space file {str(path)!r}")
    except OSError as e:
        raise ConfigError(f"space file {str(path)!r} cannot be read ({e.strerror or e}): give a YAML file of "
                          f"config keys and ranges, {EXAMPLE}") from None
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return data, f"space file {str(path)!r}"


def load_space(space: str | Path | dict, config=None, overrides_: list[str] = ()) -> list[Param]:
    """The parameters of ``space`` (a YAML path or a dict), checked against ``config`` (what ``RLTrainer`` takes:
    a Config, a dict or a YAML path, with ``overrides_``) when given: every key is one of the config's and every
    bound or choice a value it accepts."""
    data, where = read_space(space)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where} holds {'nothing' if not data else type(data).__name__}: give a mapping of config "
                          f"keys to ranges, {EXAMPLE}")
    params = [_param(str(key), spec, where) for key, spec in data.items()]
    if config is not None:
        from llmrl.api import _config

        cfg = _config(config, list(overrides_))  # the recipe's own problems first, as its own errors
        for param in params:
            check_against_config(param, config, list(overrides_), where)
        check_used(params, config, list(overrides_), where)
    return params


# Settings of an algorithm that its description (llmrl.algorithms.describe: the start-up line, the model card)
# names whenever the algorithm reads them: a space over one of these that the recipe's algorithm does not name would
# vary nothing (e.g. ppo.init_kl_coef under GRPO, whose KL weight is critic_free.kl_coef).
ALGORITHM_KEYS = ("ppo.init_kl_coef", "ppo.kl_target", "ppo.kl_horizon", "ppo.clip_range", "ppo.clip_range_value",
                  "ppo.vf_coef", "ppo.gamma", "ppo.lam", "critic_free.kl_coef", "critic_free.num_generations",
                  "critic_free.clip_range_high")


def check_used(params: list[Param], config, overrides_: list[str] = (), where: str = "space") -> None:
    """One line for a key of ALGORITHM_KEYS that the recipe's algorithm does not read (unless the space also varies
    the algorithm): trials that differ only there would be the same run. Judged with the key at the top of its
    range, so that a recipe's 0 (a KL term off) does not hide that a larger value is used."""
    from llmrl.algorithms import describe
    from llmrl.api import _config

    if any(p.key == "algorithm" for p in params):
        return
    for param in params:
        if param.key not in ALGORITHM_KEYS:
            continue
        top = param.choices[-1] if param.kind == "categorical" else param.high
        cfg = _config(config, [*overrides_, *overrides({param.key: top})])
        described = " ".join(text for _, text in describe(cfg))
        key = param.key
        if f"{key}=" not in described:
            raise ConfigError(f"{where}: {key} is not used by algorithm {cfg.algorithm} (it runs: {described}): "
                              f"varying it would change nothing; search a setting it reads, or set algorithm")


def check_against_config(param: Param, config, overrides_: list[str], where: str = "space") -> None:
    """Raise the config's own one-line error when ``param``'s key is not a config key, or when one of its bounds or
    choices is a value the config refuses (e.g. a float for an int setting, or a value its checks reject)."""
    from llmrl.api import _config

    if param.kind == "categorical":
        values = list(param.choices)
    elif param.kind == "int" and not param.log and (param.high - param.low) // (param.step or 1) < 64:
        values = list(range(param.low, param.high + 1, param.step or 1))  # each (e.g. a group size must divide)
    elif param.step is not None:  # the top of a stepped range is the last step at or below high
        values = [param.low, param.low + ((param.high - param.low) // param.step) * param.step]
    else:
        values = [param.low, param.high]
    for value in values:
        try:
            _config(config, [*overrides_, *overrides({param.key: value})])
        except ConfigError as e:
            if str(e).startswith("unknown config key"):
                raise ConfigError(f"{where}: {e}") from None
            raise ConfigError(f"{where}: {param.key} = {value!r} is refused by the recipe: {e}") from None
