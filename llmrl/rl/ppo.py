"""PPO for language models: per-token rewards, GAE, clipped policy and value losses. Imports only torch.

Shapes follow the notation in ``llmrl.rl``: (B, T) over response tokens, ``mask`` marks real tokens.
"""
from __future__ import annotations

import torch

from llmrl.rl.ops import kl_penalty, masked_mean


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) response mask -> (B,) index of the last real token (responses are contiguous from 0)."""
    lengths = mask.sum(dim=1).long()
    if (lengths == 0).any():
        bad = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"responses {bad} have no tokens; every response needs at least one token")
    return lengths - 1


def compute_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * KL_t, with the sequence score added at the last response token.

    Returns (rewards, kl), both (B, T) and zero on masked positions (Ziegler et al. 2019, eq. 2). A row with no
    response token (a sample the reward skipped, whose mask is all zero) gets no reward at all.
    """
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.nonzero(mask.sum(dim=1) > 0).flatten()
    last = last_token_index(mask[rows])
    rewards[rows, last] += scores[rows].to(rewards.dtype)
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, right to left (Schulman et al. 2016, eq. 16).

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        with V = 0 after the last real token
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A_t + V(s_t)

    Returns (advantages, returns), both (B, T), zero on masked positions. Advantages are not whitened.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    num_tokens: float | torch.Tensor | None = None,
    clip_range_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    loss = mean_t max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps_high)),  r_t = pi(a_t|s_t) / pi_old(a_t|s_t).
    ``eps_high`` is ``clip_range_high``, by default ``clip_range``; a larger one is DAPO's clip-higher (Yu et al.
    2025, eq. 10), which leaves unlikely tokens room to grow. The mean is over the masked tokens, or
    ``sum / num_tokens`` when a microbatch passes its minibatch's count (any constant divisor, e.g. Dr. GRPO's).
    Returns the loss and detached statistics: clipfrac, approx_kl (k3 of pi_old vs pi), ratio mean.
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    Returns the loss and detached statistics: clipfrac (share of tokens where the clipped term won).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((losses_clipped > losses).float(), mask)}
    return loss, stats
