"""Advantage estimators, one class each, selected by ``algorithm:`` in the YAML.

Built in: ppo (critic + GAE), grpo, rloo, reinforce, dr_grpo, dapo, gspo, cispo, sapo (critic-free; see each module's
docstring). ``algorithm: path/to/file.py:Class`` or ``package.module:Class`` selects an ``Estimator``
subclass defined anywhere, loaded like a reward function. DPO, KTO and ILQL are offline and live in
``llmrl.trainers.dpo``, ``llmrl.trainers.kto`` and ``llmrl.trainers.ilql``.
"""
from __future__ import annotations

# Each built-in module registers its estimator on import; this order is the one error messages list.
from llmrl.algorithms import ppo, grpo, rloo, reinforce, dr_grpo, dapo, gspo, cispo, sapo  # noqa: F401, I001
from llmrl.algorithms.base import ESTIMATORS, Estimator, GroupEstimator, SequenceEstimator, register
from llmrl.errors import ConfigError

OFFLINE = ("dpo", "kto", "ilql", "sft")  # algorithms without rollouts, hence without an estimator (sft: llmrl.trainers.sft)


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


def describe(cfg, load: bool = True) -> list[tuple[str, str]]:
    """(label, text) rows naming the settings of the algorithm ``cfg`` runs, and only its own, with their config
    keys: its loss and advantages (``Estimator.settings``; the loss aggregation; the entropy bonus when on), then
    how the KL to the reference enters it. The model card and the start-up line show these.

    ``load=False``: an estimator named by a path is not imported (a checkpoint's config is not trusted code) unless
    this process has loaded it already; its row then only names it."""
    def listed(settings: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in settings.items())

    if cfg.algorithm == "kto":
        k = cfg.kto
        return [("kto", listed({"kto.beta": k.beta, "kto.desirable_weight": k.desirable_weight,
                                "kto.undesirable_weight": k.undesirable_weight, "kto.batch_size": k.batch_size,
                                **({} if k.desirable_share is None else {"kto.desirable_share": k.desirable_share})})),
                ("KL", f"KTO's reference point: the KL to the reference (the adapter disabled) on mismatched pairs, "
                       f"kto.beta={k.beta}")]
    if cfg.algorithm == "ilql":
        q = cfg.ilql
        return [("ilql", listed({"ilql.tau": q.tau, "ilql.gamma": q.gamma, "ilql.cql_scale": q.cql_scale,
                                 "ilql.awac_scale": q.awac_scale, "ilql.alpha": q.alpha,
                                 "ilql.steps_for_target_q_sync": q.steps_for_target_q_sync, "ilql.beta": q.beta,
                                 "ilql.batch_size": q.batch_size,
                                 **({} if q.positive_share is None else {"ilql.positive_share": q.positive_share,
                                                                         "ilql.positive_reward": q.positive_reward})})),
                ("KL", f"none: the AWAC term (the LM's likelihood of the logged answers, "
                       f"ilql.awac_scale={q.awac_scale}) keeps the policy near the log")]
    if cfg.algorithm in OFFLINE:
        d = cfg.dpo
        return [("dpo", listed({"dpo.loss": d.loss, "dpo.beta": d.beta, "dpo.batch_size": d.batch_size})),
                ("KL", f"DPO's implicit KL to the reference (the adapter disabled), dpo.beta={d.beta}")]
    if not load and cfg.algorithm not in ESTIMATORS and cfg.algorithm not in _LOADED:
        return [(cfg.algorithm, "a custom estimator: its settings are in its code")]
    est = make_estimator(cfg)
    settings = {**est.settings(), "train.loss_aggregation": est.aggregation}
    if cfg.ppo.ent_coef:
        settings["ppo.ent_coef"] = cfg.ppo.ent_coef
    return [(est.name or cfg.algorithm, listed(settings)), ("KL", est.kl_description())]


__all__ = ["describe", "ESTIMATORS", "Estimator", "GroupEstimator", "SequenceEstimator", "estimator_class", "make_estimator", "register"]
