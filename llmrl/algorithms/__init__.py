"""Advantage estimators, one class each, selected by ``algorithm:`` in the YAML.

Built in: ppo (critic + GAE), grpo, rloo, reinforce, dr_grpo, dapo, gspo, cispo, sapo (critic-free; see each module's
docstring). ``algorithm: path/to/file.py:Class`` or ``package.module:Class`` selects an ``Estimator``
subclass defined anywhere, loaded like a reward function. DPO is offline and lives in ``llmrl.trainers.dpo``.
"""
from __future__ import annotations

# Each built-in module registers its estimator on import; this order is the one error messages list.
from llmrl.algorithms import ppo, grpo, rloo, reinforce, dr_grpo, dapo, gspo, cispo, sapo  # noqa: F401, I001
from llmrl.algorithms.base import ESTIMATORS, Estimator, GroupEstimator, SequenceEstimator, register
from llmrl.errors import ConfigError

OFFLINE = ("dpo", "sft")  # algorithms without rollouts, hence without an estimator (sft: llmrl.trainers.sft)


_LOADED: dict[str, type[Estimator]] = {}  # classes named by a path, imported once per process


def estimator_class(spec: str, key: str = "algorithm") -> type[Estimator]:
    """The estimator ``spec`` names: a registered name, or ``module:Class`` / ``file.py:Class``."""
    if spec in ESTIMATORS:
        return ESTIMATORS[spec]
    if spec in _LOADED:
        return _LOADED[spec]
    if ":" not in spec:
        raise ConfigError(f"{key} is {spec!r}: use {', '.join([*ESTIMATORS, *OFFLINE])}, or name an Estimator "
                          f"subclass as path/to/file.py:Class or package.module:Class")
    from llmrl.user_functions import load_named

    cls = load_named(spec, key)
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise ConfigError(f"{key} = {spec!r} is not a subclass of llmrl.algorithms.Estimator: derive it from "
                          f"Estimator (or SequenceEstimator) and implement advantages")
    _LOADED[spec] = cls
    return cls


def make_estimator(cfg, all_reduce_sum=lambda x: x):
    """The estimator of ``cfg.algorithm``; None for DPO, which has no rollouts to estimate advantages of.
    ``all_reduce_sum`` sums a tensor over the data-parallel ranks (the strategy's), for batch statistics."""
    return None if cfg.algorithm in OFFLINE else estimator_class(cfg.algorithm)(cfg, all_reduce_sum)


__all__ = ["ESTIMATORS", "Estimator", "GroupEstimator", "SequenceEstimator", "estimator_class", "make_estimator", "register"]
