"""GRPO's estimator: group-normalised scores, the KL to the reference as a loss term (Shao et al. 2024)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import GroupEstimator, register


@register
class GRPOEstimator(GroupEstimator):
    """Group-normalised scores; KL to the reference (k3) as a loss term, not in the reward."""

    name, kl_in_reward, loss_kl = "grpo", False, True

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        super().__init__(cfg, all_reduce_sum)
        self.scale = cfg.critic_free.scale

    def settings(self) -> dict:
        return {**super().settings(), "critic_free.scale": self.scale}

    def sequence_advantages(self, scores, valid):
        batch_std = self.batch_stats(scores, valid)[2] if self.scale == "batch" else None
        return rl.grpo_advantages(scores, self.group_size, self.scale, valid=valid, batch_std=batch_std)
