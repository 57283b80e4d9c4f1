"""Sequence-level pieces of the critic-free estimators: GSPO's sequence importance ratio and DAPO's filter of
groups that carry no signal. Imports only torch.

Shapes as in ``llmrl.rl``: ``logprobs``, ``old_logprobs``, ``mask`` (B, T); ``advantages`` (B, T) with one
value per sequence spread over its tokens (or (B,)); ``scores`` and ``valid`` (B,), in groups of ``k``
consecutive completions of one prompt.
"""
from __future__ import annotations

import torch


def sequence_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    num_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's clipped objective (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7):

    s_i = exp(mean_t log(pi(y_i,t) / pi_old(y_i,t))), the length-normalised sequence ratio;
    loss = sum_i max(-A_i * s_i, -A_i * clip(s_i, 1 - clip_low, 1 + clip_high)) / num_sequences.

    One ratio per sequence, clipped as a whole: a sequence whose tokens drifted together is clipped together,
    instead of token by token. ``num_sequences``: the divisor (default: the rows with a token), so that
    microbatches can divide by their minibatch's count. A row without tokens (a skipped sample) adds nothing.
    Returns the loss and detached statistics: clipfrac (of sequences), approx_kl (per token, as
    ``policy_loss``), ratio (the mean sequence ratio).
    """
    lengths = mask.sum(dim=1)
    has_tokens = (lengths > 0).to(logprobs.dtype)
    token_log_ratio = (logprobs - old_logprobs) * mask
    seq_log_ratio = token_log_ratio.sum(dim=1) / lengths.clamp(min=1)
    ratio = torch.exp(seq_log_ratio)
    adv = advantages if advantages.dim() == 1 else (advantages * mask).sum(dim=1) / lengths.clamp(min=1)
    losses = -adv * ratio
    losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    divisor = has_tokens.sum().clamp(min=1) if num_sequences is None else num_sequences
    loss = (torch.maximum(losses, losses_clipped) * has_tokens).sum() / divisor
    with torch.no_grad():
        rows = has_tokens.sum().clamp(min=1)
        n_tokens = mask.sum().clamp(min=1)
        stats = {
            "clipfrac": ((losses_clipped > losses).to(logprobs.dtype) * has_tokens).sum() / rows,
            "approx_kl": ((torch.expm1(token_log_ratio) - token_log_ratio) * mask).sum() / n_tokens,
            "ratio": (ratio * has_tokens).sum() / rows,
        }
    return loss, stats


def informative_groups(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None,
                       tol: float = 1e-6) -> torch.Tensor:
    """(B,) bool: the samples whose group of ``k`` has two scored samples whose scores differ by more than
    ``tol``. DAPO's dynamic sampling (Yu et al. 2025, eq. 11) keeps only those: a group whose completions all
    scored alike (all right, all wrong) has zero group-relative advantage and only dilutes the batch.
    ``valid`` (B,) bool: samples the reward skipped count neither way (and are never kept)."""
    if k < 1 or scores.numel() % k != 0:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {k} completions per prompt")
    ok = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    g = scores.view(-1, k)
    w = ok.view(-1, k)
    high = torch.where(w, g, torch.full_like(g, -torch.inf)).max(dim=1).values
    low = torch.where(w, g, torch.full_like(g, torch.inf)).min(dim=1).values
    spread = (w.sum(dim=1) >= 2) & (high - low > tol)
    return spread.repeat_interleave(k) & ok
