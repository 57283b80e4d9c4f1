"""Critic-free advantage estimators: GRPO, RLOO and REINFORCE with a running-mean baseline. Imports only torch.

Each turns one scalar score per completion into one advantage per completion; the trainer spreads it over
the completion's tokens. ``scores`` (B,) is laid out in groups of ``k`` consecutive completions of the same
prompt (B = n_prompts * k).
"""
from __future__ import annotations

import torch


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k < 1 or scores.numel() % k != 0:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {k} completions per prompt")
    return scores.view(-1, k)


def grpo_advantages(scores: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / std (Shao et al. 2024, "DeepSeekMath", eq. 3 / section 4.1.2).

    ``scale``: "group" divides by the group's std, "batch" by the std of all scores (Liu et al. 2025 argue
    per-group scaling biases towards easy and hard prompts), "none" only centres. Stds are Bessel-corrected.
    """
    g = _groups(scores, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (scores.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown GRPO scale {scale!r}: use group, batch or none")
    return centred.flatten()


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i - mean of the other k - 1 scores of its group (Ahmadian et al. 2024, eq. 6; Kool et al. 2019)."""
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt for a leave-one-out baseline, got {k}")
    g = _groups(scores, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).flatten()


class RunningBaseline:
    """REINFORCE's baseline: an exponential moving average of the mean score, A = r - b (Williams 1992).

    The advantages of a batch use the baseline from before it; then the baseline moves towards its mean.
    """

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.value: float | None = None

    def advantages(self, scores: torch.Tensor) -> torch.Tensor:
        baseline = scores.mean().item() if self.value is None else self.value
        advantages = scores - baseline
        mean = scores.mean().item()
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean
        return advantages

    def state_dict(self) -> dict:
        return {"value": self.value, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.momentum = state["value"], state["momentum"]
