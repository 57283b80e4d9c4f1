"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): GRPO's group-normalised advantages with one
importance ratio per sequence, the geometric mean of its token ratios, clipped as a whole to
[1 - critic_free.sequence_clip_low, 1 + critic_free.sequence_clip_high] (3e-4 and 4e-4 in the paper: a
length-normalised ratio moves far less than a token's). The loss is the mean over sequences; the KL to the
reference is a loss term, as in GRPO (critic_free.kl_coef)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import GroupEstimator, register


@register
class GSPOEstimator(GroupEstimator):
    name, kl_in_reward, loss_kl = "gspo", False, True

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        super().__init__(cfg, all_reduce_sum)
        self.clip_low, self.clip_high = cfg.critic_free.sequence_clip_low, cfg.critic_free.sequence_clip_high

    @classmethod
    def config_checks(cls, cfg):
        c = cfg.critic_free
        return [*super().config_checks(cfg),
                (0 < c.sequence_clip_low < 1, "critic_free.sequence_clip_low",
                 f"is {c.sequence_clip_low}: must be in (0, 1) (3e-4 in the paper)"),
                (c.sequence_clip_high > 0, "critic_free.sequence_clip_high",
                 f"is {c.sequence_clip_high}: must be > 0 (4e-4 in the paper)")]

    def settings(self) -> dict:  # one clip per sequence, none per token: ppo.clip_range is not read
        return {"critic_free.num_generations": self.group_size, "critic_free.sequence_clip_low": self.clip_low,
                "critic_free.sequence_clip_high": self.clip_high}

    def sequence_advantages(self, scores, valid):
        return rl.grpo_advantages(scores, self.group_size, "group", valid=valid)

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, num_tokens, num_sequences):
        return rl.sequence_policy_loss(logprobs, old_logprobs, advantages, mask, self.clip_low, self.clip_high,
                                       num_sequences)
