"""The estimator interface: how a rollout's scores become per-token advantages, and the policy loss they feed.

An estimator is one class. The trainer owns everything else (rollouts, rewards, the reference KL, the
optimizer, checkpoints) and asks the estimator only what differs between algorithms:

- ``completions_per_prompt(cfg)``: 1, or the group size of a group-relative method;
- ``config_checks(cfg)``: (ok, key, message) rows, checked with the rest of the config;
- ``uses_critic`` (a value head is trained), ``kl_in_reward`` (-beta * KL enters the reward, and the adaptive
  controller moves beta) and ``loss_kl_coef`` (a k3 KL term in the loss instead);
- ``keep(scores, valid)``: the samples to train on (DAPO drops groups that carry no signal);
- ``advantages(...)`` and ``policy_loss(...)``.

Built-in estimators register themselves by name (``register``); ``algorithm: path/to/file.py:Class`` or
``package.module:Class`` names one defined anywhere (``llmrl.algorithms.estimator_class``). Imports only
torch and ``llmrl.rl``.
"""
from __future__ import annotations

import torch

from llmrl import rl

ESTIMATORS: dict[str, type["Estimator"]] = {}


def register(cls: type["Estimator"]) -> type["Estimator"]:
    """Class decorator: ``algorithm: NAME`` selects ``cls`` (``cls.name``)."""
    ESTIMATORS[cls.name] = cls
    return cls


class Estimator:
    """Base class of every estimator; the defaults are PPO's token-level clipped loss on one completion per
    prompt, with the KL in the reward."""

    name = ""
    uses_critic, kl_in_reward, loss_kl_coef = False, True, 0.0
    # How the loss's per-token terms (policy, entropy, KL) become one number (``llmrl.rl.aggregate``), unless
    # ``train.loss_aggregation`` names another: token_mean, sequence_mean or token_sum.
    aggregation = "token_mean"

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        """``all_reduce_sum`` sums a tensor over the data-parallel ranks (the strategy's), for batch statistics."""
        self.cfg, self.ppo = cfg, cfg.ppo
        self.all_reduce_sum = all_reduce_sum
        self.group_size = self.completions_per_prompt(cfg)
        chosen = getattr(cfg.train, "loss_aggregation", "default")
        self.aggregation = type(self).aggregation if chosen == "default" else chosen
        self.max_tokens = cfg.generation.max_new_tokens

    def reduce(self, x, mask, num_tokens, num_sequences):
        """A (B, T) per-token loss term of one microbatch -> its share of the minibatch's loss, aggregated as
        ``self.aggregation`` says with the minibatch's divisors (token_sum: sequences x generation.max_new_tokens)."""
        return rl.aggregate(x, mask, self.aggregation, num_tokens, num_sequences, num_sequences * self.max_tokens)

    @classmethod
    def completions_per_prompt(cls, cfg) -> int:
        return 1

    @classmethod
    def config_checks(cls, cfg) -> list[tuple[bool, str, str]]:
        """(ok, dotted key, 'is VALUE: what to do') rows; a failing one stops the config from loading."""
        return []

    def keep(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the scored samples to train on (all of them by default)."""
        return valid

    def advantages(self, scores, logprobs, ref_logprobs, values, mask, kl_coef, valid, step_rewards=None):
        """(advantages (B, T), returns (B, T) or None without a critic).

        ``step_rewards`` (B, T), multi-turn episodes only: each step's reward on the last token of the model turn
        that earned it, summing per row to ``scores``. A sequence-level estimator may ignore it; the trainer
        passes it only when there is one, so estimators written without it still run on single-turn data."""
        raise NotImplementedError

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, num_tokens, num_sequences):
        """(loss, detached stats with clipfrac, approx_kl and ratio) of one microbatch. ``num_tokens`` and
        ``num_sequences``: the token and sequence counts of its whole minibatch (per rank), the divisors that
        make accumulated microbatches equal one pass over the minibatch."""
        return rl.policy_loss(logprobs, old_logprobs, advantages, mask, self.ppo.clip_range, num_tokens,
                              **self.divisors(num_sequences))

    def divisors(self, num_sequences) -> dict:
        """The aggregation keywords of ``rl.policy_loss`` and the gated losses, besides ``num_tokens``."""
        return {"aggregation": self.aggregation, "num_sequences": num_sequences,
                "constant": num_sequences * self.max_tokens}

    def logged_kl(self, beta: float) -> tuple[str, str, float | None]:
        """(metric name, per-token estimator, coefficient or None) of the KL to the reference that the trainer
        logs: the KL this estimator trains with, as it uses it. In the reward (PPO, RLOO, REINFORCE):
        ``objective/kl`` with ``ppo.kl_estimator`` and the controller's beta; a loss term (GRPO's way):
        ``objective/kl`` with k3 and its weight; no KL anywhere (DAPO, or GRPO with critic_free.kl_coef 0):
        ``info/kl_ref``, k3, for information, with no coefficient."""
        if self.kl_in_reward:
            return "objective/kl", self.ppo.kl_estimator, beta
        if self.loss_kl_coef:
            return "objective/kl", "k3", self.loss_kl_coef
        return "info/kl_ref", "k3", None

    def settings(self) -> dict:
        """The config keys this estimator's advantages and loss read, with their values: what the model card and
        the start-up line show. The default loss clips the token ratio to 1 +- ppo.clip_range."""
        return {"ppo.clip_range": self.ppo.clip_range}

    def kl_description(self) -> str:
        """How the KL to the reference enters this estimator's training, in words with its config keys."""
        p = self.ppo
        if self.kl_in_reward:
            how = (f"adaptive towards ppo.kl_target={p.kl_target} over ppo.kl_horizon={p.kl_horizon:g}"
                   if p.adaptive_kl else "fixed (ppo.adaptive_kl=False)")
            return (f"in the reward: -beta x {p.kl_estimator} per token, beta from "
                    f"ppo.init_kl_coef={p.init_kl_coef}, {how}")
        if self.loss_kl_coef:
            return f"a loss term: critic_free.kl_coef={self.loss_kl_coef} x k3 to the reference"
        return "none in the loss (the k3 KL to the reference is logged as info/kl_ref, for information)"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SequenceEstimator(Estimator):
    """Critic-free: one advantage per completion, spread over its tokens; ``critic_free.num_generations``
    completions per prompt, consecutive in the batch."""

    @classmethod
    def completions_per_prompt(cls, cfg) -> int:
        return cfg.critic_free.num_generations

    @classmethod
    def config_checks(cls, cfg):
        n = cfg.critic_free.num_generations
        return [(n >= 1, "critic_free.num_generations", f"is {n}: must be >= 1")]

    def settings(self) -> dict:
        return {"critic_free.num_generations": self.group_size, **super().settings()}

    def batch_stats(self, scores, valid) -> tuple[int, float, float]:
        """(count, mean, Bessel-corrected std) of the scored samples of every rank."""
        n, mean, m2 = rl.moments_stats(self.all_reduce_sum(rl.masked_moments(scores, valid.to(scores.dtype))))
        return n, mean, (m2 / (n - 1)) ** 0.5 if n > 1 else 0.0

    def sequence_scores(self, scores, logprobs, ref_logprobs, mask, kl_coef):
        if not self.kl_in_reward:
            return scores
        kl = rl.kl_penalty(logprobs, ref_logprobs, self.ppo.kl_estimator) * mask
        return scores - kl_coef * kl.sum(1)

    def sequence_advantages(self, scores, valid):
        """(B,) advantages of the (B,) sequence scores."""
        raise NotImplementedError

    def advantages(self, scores, logprobs, ref_logprobs, values, mask, kl_coef, valid, step_rewards=None):
        seq = self.sequence_advantages(self.sequence_scores(scores, logprobs, ref_logprobs, mask, kl_coef), valid)
        return seq.unsqueeze(1) * mask, None


class GroupEstimator(SequenceEstimator):
    """Group-relative: each completion is judged against the others of its prompt, so a prompt needs at least two.
    ``loss_kl``: the k3 KL to the reference is a loss term weighted by ``critic_free.kl_coef`` (GRPO's way;
    such estimators also set ``kl_in_reward = False``)."""

    loss_kl = False

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        super().__init__(cfg, all_reduce_sum)
        if self.loss_kl:
            self.loss_kl_coef = cfg.critic_free.kl_coef

    @classmethod
    def config_checks(cls, cfg):
        return needs_groups(cls, cfg)


def needs_groups(cls, cfg, least: int = 2) -> list[tuple[bool, str, str]]:
    """The check of a group-relative method: at least ``least`` completions per prompt to compare."""
    n = cfg.critic_free.num_generations
    return [(n >= least, "critic_free.num_generations",
             f"is {n}: {cls.name.upper()} needs at least {least} completions per prompt to compare")]
