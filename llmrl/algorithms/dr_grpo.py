"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", section 3.1):
GRPO without its two biases. Scores are only centred in their group (no division by the group's std, which
favours prompts that are nearly always or never solved), and the loss sums over tokens and divides by a
constant, minibatch sequences x ``generation.max_new_tokens``, instead of by the tokens generated (which gives
long wrong answers a smaller per-token penalty than short ones)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import GroupEstimator, register


@register
class DrGRPOEstimator(GroupEstimator):
    name, kl_in_reward, loss_kl = "dr_grpo", False, True
    aggregation = "token_sum"  # the policy, entropy and KL terms alike

    def sequence_advantages(self, scores, valid):
        return rl.grpo_advantages(scores, self.group_size, "none", valid=valid)
