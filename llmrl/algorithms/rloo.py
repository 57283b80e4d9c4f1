"""RLOO's estimator: a leave-one-out baseline per prompt (Ahmadian et al. 2024)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import GroupEstimator, register


@register
class RLOOEstimator(GroupEstimator):
    """Leave-one-out baseline over the k completions of each prompt; KL in the sequence reward."""

    name = "rloo"

    def sequence_advantages(self, scores, valid):
        return rl.rloo_advantages(scores, self.group_size, valid)
