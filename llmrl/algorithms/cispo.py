"""CISPO (MiniMax-M1, Chen et al. 2025, section 3.1): group-normalised advantages as GRPO's, and a REINFORCE-style
loss whose importance weight min(r, 1 + critic_free.clip_range_high) is kept out of the gradient: PPO's clip
drops the gradient of every token past the bound (often the rare tokens that open a line of reasoning); CISPO keeps
every token's and only caps how much it weighs. Token-level aggregation, as the paper; the KL to the reference is a
loss term (critic_free.kl_coef; the paper uses none: set it to 0)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import GroupEstimator, register


@register
class CISPOEstimator(GroupEstimator):
    name, kl_in_reward, loss_kl = "cispo", False, True

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        super().__init__(cfg, all_reduce_sum)
        self.clip_high = cfg.critic_free.clip_range_high

    @classmethod
    def config_checks(cls, cfg):
        high = cfg.critic_free.clip_range_high
        return [*super().config_checks(cfg),
                (high > 0, "critic_free.clip_range_high", f"is {high}: CISPO caps the weight at 1 + this; must be > 0")]

    def settings(self) -> dict:  # the weight capped at 1 + clip_range_high; ppo.clip_range is not read
        return {"critic_free.num_generations": self.group_size, "critic_free.clip_range_high": self.clip_high}

    def sequence_advantages(self, scores, valid):
        return rl.grpo_advantages(scores, self.group_size, "group", valid=valid)

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, num_tokens, num_sequences):
        return rl.cispo_loss(logprobs, old_logprobs, advantages, mask, self.clip_high, num_tokens=num_tokens,
                             **self.divisors(num_sequences))
