"""RLOO's estimator: a leave-one-out baseline per prompt (Ahmadian et al. 2024)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import SequenceEstimator, needs_groups, register


@register
class RLOOEstimator(SequenceEstimator):
    """Leave-one-out baseline over the k completions of each prompt; KL in the sequence reward."""

    name = "rloo"

    @classmethod
    def config_checks(cls, cfg):
        return needs_groups(cls, cfg)

    def sequence_advantages(self, scores, valid):
        return rl.rloo_advantages(scores, self.group_size, valid)
