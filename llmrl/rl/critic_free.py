"""Critic-free advantage estimators: GRPO, RLOO and REINFORCE with a running-mean baseline. Imports only torch.

Each turns one scalar score per completion into one advantage per completion; the trainer spreads it over
the completion's tokens. ``scores`` (B,) is laid out in groups of ``k`` consecutive completions of the same
prompt (B = n_prompts * k).
"""
from __future__ import annotations

import torch


def _groups(scores: torch.Tensor, k: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_prompts, k) scores and the matching 1.0/0.0 weights of the samples that have a score."""
    if k < 1 or scores.numel() % k != 0:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {k} completions per prompt")
    if valid is None:
        return scores.view(-1, k), torch.ones_like(scores).view(-1, k)
    # Zeroed, not just weighted by 0: a skipped sample's score may be NaN.
    return torch.where(valid, scores, 0.0).view(-1, k), valid.to(scores.dtype).view(-1, k)


def _masked_std(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(n, 1): the Bessel-corrected std of each row of ``x`` over the entries where ``w`` is 1 (0 where fewer
    than two are)."""
    n = w.sum(dim=1, keepdim=True)
    mean = (x * w).sum(dim=1, keepdim=True) / n.clamp(min=1)
    return (((x - mean) ** 2 * w).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()


def grpo_advantages(scores: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4,
                    valid: torch.Tensor | None = None, batch_std: float | None = None) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / std (Shao et al. 2024, "DeepSeekMath", eq. 3 / section 4.1.2).

    ``scale``: "group" divides by the group's std, "batch" by the std of all scores (Liu et al. 2025 argue
    per-group scaling biases towards easy and hard prompts), "none" only centres. Stds are Bessel-corrected.
    ``valid`` (B,) bool: samples the reward skipped are left out of every mean and std and get 0; so does a
    sample without another scored one in its group (nothing to compare it with). ``batch_std``: the std
    for "batch" when the batch spans more than ``scores`` (all data-parallel ranks); default: theirs.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown GRPO scale {scale!r}: use group, batch or none")
    g, w = _groups(scores, k, valid)
    mean = (g * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1)
    centred = (g - mean) * w
    if scale == "group":
        centred = centred / (_masked_std(g, w) + eps)
    elif scale == "batch":
        std = _masked_std(g.reshape(1, -1), w.reshape(1, -1)) if batch_std is None else batch_std
        centred = centred / (std + eps)
    return centred.flatten()


def rloo_advantages(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = r_i - mean of the other k - 1 scores of its group (Ahmadian et al. 2024, eq. 6; Kool et al. 2019).

    ``valid`` (B,) bool: samples the reward skipped are left out of the baselines and get 0; so does a sample
    with no other scored sample in its group.
    """
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt for a leave-one-out baseline, got {k}")
    g, w = _groups(scores, k, valid)
    others = w.sum(dim=1, keepdim=True) - w
    baseline = ((g * w).sum(dim=1, keepdim=True) - g * w) / others.clamp(min=1)
    return ((g - baseline) * w * (others > 0)).flatten()


class RunningBaseline:
    """REINFORCE's baseline: an exponential moving average of the mean score, A = r - b (Williams 1992).

    The advantages of a batch use the baseline from before it; then the baseline moves towards its mean.
    """

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.value: float | None = None

    def advantages(self, scores: torch.Tensor, valid: torch.Tensor | None = None,
                   batch_mean: float | None = None) -> torch.Tensor:
        """``valid`` (B,) bool: samples the reward skipped get 0 and stay out of the mean. ``batch_mean``: the
        mean score when the batch spans more than ``scores`` (all data-parallel ranks); default: theirs."""
        mean = batch_mean
        if mean is None:
            kept = scores if valid is None else scores[valid]
            if kept.numel() == 0:
                return torch.zeros_like(scores)
            mean = kept.mean().item()
        baseline = mean if self.value is None else self.value
        advantages = scores - baseline if valid is None else torch.where(valid, scores - baseline, 0.0)
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean
        return advantages

    def state_dict(self) -> dict:
        return {"value": self.value, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.momentum = state["value"], state["momentum"]
