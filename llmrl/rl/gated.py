"""Policy losses that bound the importance ratio's effect without PPO's hard clip. Imports only torch.

Shapes as in ``llmrl.rl``; ``advantages`` (B, T) (a sequence's advantage on each of its tokens). ``aggregation``,
``num_tokens``, ``num_sequences`` and ``constant``: how the per-token losses become one number, as for
``llmrl.rl.policy_loss`` (see ``llmrl.rl.aggregate``).
"""
from __future__ import annotations

import torch

from llmrl.rl.aggregate import aggregate


def cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_high: float, aggregation: str = "token_mean", num_tokens=None, num_sequences=None,
               constant=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4-5): a REINFORCE-style loss whose importance weight is clipped and
    kept out of the gradient, so that no token's gradient is dropped (PPO's clip drops them):

        loss_t = -sg(min(r_t, 1 + clip_high)) * A_t * log pi(a_t|s_t),   r_t = pi / pi_old.

    The paper sets no lower bound. Returns the loss and detached statistics: clipfrac (share of tokens whose
    weight was capped), approx_kl (k3 of pi_old vs pi), ratio mean."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, max=1.0 + clip_high).detach()
    loss = aggregate(-weight * advantages * logprobs, mask, aggregation, num_tokens, num_sequences, constant)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {"clipfrac": ((ratio > 1.0 + clip_high).float() * mask).sum() / n,
                 "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * mask).sum() / n,
                 "ratio": (ratio * mask).sum() / n}
    return loss, stats


def sapo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              tau_pos: float, tau_neg: float, aggregation: str = "token_mean", num_tokens=None, num_sequences=None,
              constant=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"): a smooth gate instead of the hard clip,

        loss_t = -g_t * A_t,   g_t = sigmoid(tau * (r_t - 1)) * 4 / tau,   tau = tau_pos if A_t > 0 else tau_neg,

    whose gradient equals the plain surrogate's at r = 1 and fades smoothly as r leaves 1 (faster for negative
    advantages, tau_neg > tau_pos). Returns the loss and detached statistics: clipfrac (share of tokens whose gate's
    slope has fallen below half of its on-policy value), approx_kl, ratio mean."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    loss = aggregate(-gate * advantages, mask, aggregation, num_tokens, num_sequences, constant)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        s = torch.sigmoid(tau * (ratio - 1.0))
        stats = {"clipfrac": (((4 * s * (1 - s)) < 0.5).float() * mask).sum() / n,
                 "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * mask).sum() / n,
                 "ratio": (ratio * mask).sum() / n}
    return loss, stats
