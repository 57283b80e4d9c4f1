"""Rewards: plain callables ``(prompts, completions, **kwargs) -> list[float]`` (TRL's reward signature).

A reward is named in the config as ``package.module:function`` or ``path/to/file.py:function`` and is
imported once at start-up, so a wrong path fails before any training.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from pathlib import Path
from typing import Callable

from llmrl.config import ConfigError

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward raised or returned something unusable; the message names the reward and the sample."""


def load_reward_function(spec: str) -> RewardFn:
    if ":" not in spec:
        raise ConfigError(f"reward.function = {spec!r} must look like 'package.module:function' or "
                          f"'path/to/file.py:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"reward.function = {spec!r}: file {target!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"llmrl_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"reward.function = {spec!r}: importing {target!r} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"reward.function = {spec!r}: cannot import {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"reward.function = {spec!r}: {target!r} has no callable named {name!r}")
    if inspect.iscoroutinefunction(fn):
        raise ConfigError(f"reward.function = {spec!r} is async; wrap it in a plain function for now")
    return fn


def call_reward(fn: RewardFn, name: str, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Call ``fn`` and check that it returned one finite number per completion."""
    try:
        scores = fn(prompts=prompts, completions=completions, **kwargs)
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {e!r} on a batch of {len(prompts)} samples; fix the "
                          f"function (the run stopped before using this batch)") from e
    try:
        scores = list(scores)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(scores).__name__}, not a list of floats") from None
    if len(scores) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(scores)} values for {len(completions)} completions: "
                          f"return exactly one score per completion")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) and not hasattr(s, "__float__"):
            raise RewardError(f"reward {name!r} returned {s!r} ({type(s).__name__}) for sample {i}: "
                              f"scores must be numbers. Completion: {completions[i][:80]!r}")
        value = float(s)
        if not math.isfinite(value):
            raise RewardError(f"reward {name!r} returned {value} for sample {i}: scores must be finite. "
                              f"Completion: {completions[i][:80]!r}")
        out.append(value)
    return out
