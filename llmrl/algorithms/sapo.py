"""SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"): group-normalised advantages as GRPO's, and a soft,
temperature-controlled gate sigmoid(tau * (r - 1)) * 4 / tau instead of the hard clip, so that off-policy tokens
fade smoothly rather than being cut off; tau is critic_free.sapo_tau_pos for positive advantages and
sapo_tau_neg (larger: faster fading) for negative ones (1.0 and 1.05 in the paper). Token-level aggregation; the
KL to the reference is a loss term (critic_free.kl_coef)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import GroupEstimator, register


@register
class SAPOEstimator(GroupEstimator):
    name, kl_in_reward, loss_kl = "sapo", False, True

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        super().__init__(cfg, all_reduce_sum)
        self.tau_pos, self.tau_neg = cfg.critic_free.sapo_tau_pos, cfg.critic_free.sapo_tau_neg

    @classmethod
    def config_checks(cls, cfg):
        c = cfg.critic_free
        return [*super().config_checks(cfg),
                (c.sapo_tau_pos > 0, "critic_free.sapo_tau_pos",
                 f"is {c.sapo_tau_pos}: must be > 0 (1.0 in the paper)"),
                (c.sapo_tau_neg >= c.sapo_tau_pos, "critic_free.sapo_tau_neg",
                 f"is {c.sapo_tau_neg}: must be >= critic_free.sapo_tau_pos = {c.sapo_tau_pos} (1.05 in the paper)")]

    def settings(self) -> dict:  # a soft gate instead of a clip: ppo.clip_range is not read
        return {"critic_free.num_generations": self.group_size, "critic_free.sapo_tau_pos": self.tau_pos,
                "critic_free.sapo_tau_neg": self.tau_neg}

    def sequence_advantages(self, scores, valid):
        return rl.grpo_advantages(scores, self.group_size, "group", valid=valid)

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, num_tokens, num_sequences):
        return rl.sapo_loss(logprobs, old_logprobs, advantages, mask, self.tau_pos, self.tau_neg, num_tokens=num_tokens,
                            **self.divisors(num_sequences))
