"""REINFORCE with a running-mean baseline (Williams 1992)."""
from __future__ import annotations

import torch

from llmrl import rl
from llmrl.algorithms.base import SequenceEstimator, register


@register
class ReinforceEstimator(SequenceEstimator):
    """Plain policy gradient with a running-mean baseline; KL in the sequence reward."""

    name = "reinforce"

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        super().__init__(cfg, all_reduce_sum)
        self.baseline = rl.RunningBaseline(cfg.critic_free.baseline_momentum)

    def settings(self) -> dict:
        return {**super().settings(), "critic_free.baseline_momentum": self.cfg.critic_free.baseline_momentum}

    def sequence_advantages(self, scores, valid):
        n, mean, _ = self.batch_stats(scores, valid)
        return self.baseline.advantages(scores, valid, mean) if n else torch.zeros_like(scores)

    def state_dict(self) -> dict:
        return self.baseline.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.baseline.load_state_dict(state)
