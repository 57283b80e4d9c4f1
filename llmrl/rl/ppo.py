"""PPO for language models: per-token rewards, GAE, clipped policy and value losses. Imports only torch.

Shapes follow the notation in ``llmrl.rl``: (B, T) over response tokens, ``mask`` marks real tokens.
"""
from __future__ import annotations

import torch

from llmrl.rl.aggregate import aggregate
from llmrl.rl.ops import kl_penalty, masked_mean


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) response mask -> (B,) index of the last real token (a multi-turn mask may have gaps)."""
    real = mask > 0
    if not real.any(dim=1).all():
        bad = torch.nonzero(~real.any(dim=1)).flatten().tolist()
        raise ValueError(f"responses {bad} have no tokens; every response needs at least one token")
    T = mask.shape[1]
    return T - 1 - real.flip(1).float().argmax(dim=1)


def compute_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    step_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * KL_t, with the sequence score added at the last response token.

    Returns (rewards, kl), both (B, T) and zero on masked positions (Ziegler et al. 2019, eq. 2). A row with no
    response token (a sample the reward skipped, whose mask is all zero) gets no reward at all.
    ``step_scores`` (B, T): scores already on their tokens (a multi-turn episode's per-turn rewards); they are
    added where they are instead of ``scores`` at the last token.
    """
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = -kl_coef * kl
    if step_scores is not None:
        return rewards + step_scores.to(rewards.dtype) * mask, kl
    rows = torch.nonzero(mask.sum(dim=1) > 0).flatten()
    last = last_token_index(mask[rows])
    rewards[rows, last] += scores[rows].to(rewards.dtype)
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, right to left (Schulman et al. 2016, eq. 16).

        delta_t = r_t + gamma * V(s_t') - V(s_t)        t' the next real token; V = 0 after the last one
        A_t     = delta_t + gamma * lam * A_t'
        returns = A_t + V(s_t)

    Masked positions are skipped, not treated as steps: in a multi-turn episode the environment's tokens
    between two model turns (mask 0) carry no reward and no value, and the model's last token of one turn is
    followed by its first token of the next. A right-padded mask (one turn) gives the textbook recursion.
    Returns (advantages, returns), both (B, T), zero on masked positions. Advantages are not whitened.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    real = mask > 0
    next_values = torch.zeros_like(values[:, 0])  # V of the next real token to the right
    last_gae = torch.zeros_like(rewards[:, 0])  # A of the next real token to the right
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        gae = delta + gamma * lam * last_gae
        last_gae = torch.where(real[:, t], gae, last_gae)
        next_values = torch.where(real[:, t], values[:, t], next_values)
        advantages[:, t] = gae
    advantages = advantages * mask
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
    aggregation: str = "token_mean",
    num_sequences: float | torch.Tensor | None = None,
    constant: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    loss = mean_t max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps_high)),  r_t = pi(a_t|s_t) / pi_old(a_t|s_t).
    ``eps_high`` is ``clip_range_high``, by default ``clip_range``; a larger one is DAPO's clip-higher (Yu et al.
    2025, eq. 10), which leaves unlikely tokens room to grow. ``aggregation`` (``llmrl.rl.aggregate``): the token
    mean by default, ``sum / num_tokens`` when a microbatch passes its minibatch's count.
    Returns the loss and detached statistics: clipfrac, approx_kl (k3 of pi_old vs pi), ratio mean.
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = aggregate(torch.maximum(pg_losses, pg_losses_clipped), mask, aggregation, num_tokens, num_sequences,
                     constant)
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
