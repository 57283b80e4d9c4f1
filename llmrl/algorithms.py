"""Advantage estimators, one small class each: ``algorithm: ppo | grpo | rloo | reinforce`` in the YAML.

They share the trainer's rollout, reward, KL and checkpoint machinery and differ only here: how scores
become per-token advantages, whether a critic is trained, and where the KL to the reference enters (the
reward for PPO, RLOO and REINFORCE; the loss for GRPO). DPO is offline and lives in ``llmrl.dpo``.
Imports only torch and ``llmrl.rl``.
"""
from __future__ import annotations

import torch

from llmrl import rl


class PPOEstimator:
    """GAE over per-token rewards (score at the last token, -beta * KL on every token), critic trained."""

    name, uses_critic, kl_in_reward, loss_kl_coef = "ppo", True, True, 0.0

    def __init__(self, cfg, all_reduce_sum):
        self.ppo = cfg.ppo
        self.group_size = 1

    def advantages(self, scores, logprobs, ref_logprobs, values, mask, kl_coef, valid):
        # A skipped sample (``valid`` False) has an all-zero ``mask``: no reward, no advantage, no return.
        rewards, _ = rl.compute_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, self.ppo.kl_estimator)
        if self.ppo.whiten_rewards:
            rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = rl.compute_gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)
        return advantages, returns

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _SequenceEstimator:
    """Critic-free: one advantage per completion, spread over its tokens."""

    uses_critic, whiten = False, False

    def __init__(self, cfg, all_reduce_sum):
        self.ppo = cfg.ppo
        self.group_size = cfg.critic_free.num_generations
        self.all_reduce_sum = all_reduce_sum  # batch statistics over all data-parallel ranks

    def batch_stats(self, scores, valid) -> tuple[int, float, float]:
        """(count, mean, Bessel-corrected std) of the scored samples of every rank."""
        n, mean, m2 = rl.moments_stats(self.all_reduce_sum(rl.masked_moments(scores, valid.to(scores.dtype))))
        return n, mean, (m2 / (n - 1)) ** 0.5 if n > 1 else 0.0

    def sequence_scores(self, scores, logprobs, ref_logprobs, mask, kl_coef):
        if not self.kl_in_reward:
            return scores
        kl = rl.kl_penalty(logprobs, ref_logprobs, self.ppo.kl_estimator) * mask
        return scores - kl_coef * kl.sum(1)

    def advantages(self, scores, logprobs, ref_logprobs, values, mask, kl_coef, valid):
        seq = self.sequence_advantages(self.sequence_scores(scores, logprobs, ref_logprobs, mask, kl_coef), valid)
        return seq.unsqueeze(1) * mask, None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GRPOEstimator(_SequenceEstimator):
    """Group-normalised scores; KL to the reference (k3) as a loss term, not in the reward."""

    name, kl_in_reward = "grpo", False

    def __init__(self, cfg, all_reduce_sum):
        super().__init__(cfg, all_reduce_sum)
        self.scale = cfg.critic_free.scale
        self.loss_kl_coef = cfg.critic_free.kl_coef

    def sequence_advantages(self, scores, valid):
        batch_std = self.batch_stats(scores, valid)[2] if self.scale == "batch" else None
        return rl.grpo_advantages(scores, self.group_size, self.scale, valid=valid, batch_std=batch_std)


class RLOOEstimator(_SequenceEstimator):
    """Leave-one-out baseline over the k completions of each prompt; KL in the sequence reward."""

    name, kl_in_reward, loss_kl_coef = "rloo", True, 0.0

    def sequence_advantages(self, scores, valid):
        return rl.rloo_advantages(scores, self.group_size, valid)


class ReinforceEstimator(_SequenceEstimator):
    """Plain policy gradient with a running-mean baseline; KL in the sequence reward."""

    name, kl_in_reward, loss_kl_coef = "reinforce", True, 0.0

    def __init__(self, cfg, all_reduce_sum):
        super().__init__(cfg, all_reduce_sum)
        self.baseline = rl.RunningBaseline(cfg.critic_free.baseline_momentum)

    def sequence_advantages(self, scores, valid):
        n, mean, _ = self.batch_stats(scores, valid)
        return self.baseline.advantages(scores, valid, mean) if n else torch.zeros_like(scores)

    def state_dict(self) -> dict:
        return self.baseline.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.baseline.load_state_dict(state)


ESTIMATORS = {e.name: e for e in (PPOEstimator, GRPOEstimator, RLOOEstimator, ReinforceEstimator)}


def make_estimator(cfg, all_reduce_sum=lambda x: x):
    """The estimator of ``cfg.algorithm``; None for DPO, which has no rollouts to estimate advantages of.
    ``all_reduce_sum`` sums a tensor over the data-parallel ranks (the strategy's), for batch statistics."""
    return None if cfg.algorithm == "dpo" else ESTIMATORS[cfg.algorithm](cfg, all_reduce_sum)


__all__ = ["ESTIMATORS", "make_estimator"]
