"""How per-token loss terms become one number: the loss aggregation, a named choice. Imports only torch.

- ``token_mean``: the sum over every token of the minibatch / its token count (DAPO's token-level loss; TRL's
  ``loss_type="dapo"``/``"bnpo"``, verl's ``token-mean``). Long sequences weigh by their length.
- ``sequence_mean``: each sequence's token mean, then the mean over sequences (GRPO's paper, DeepSeekMath eq. 3;
  TRL's ``loss_type="grpo"``, verl's ``seq-mean-token-mean``). Every sequence weighs the same.
- ``token_sum``: the sum over every token / a constant, the minibatch's sequences x ``max_new_tokens`` (Dr. GRPO,
  Liu et al. 2025; TRL's ``loss_type="dr_grpo"``, verl's ``seq-mean-token-sum-norm``). No length bias either way.

Exact under gradient accumulation: a microbatch passes its whole minibatch's divisor (``num_tokens``,
``num_sequences``, ``constant``, per rank), so the microbatches' results sum to the minibatch's, and ranks whose
gradients are averaged each divide by the global count / the number of ranks.
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum")


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: float | torch.Tensor | None = None,
              num_sequences: float | torch.Tensor | None = None, constant: float | torch.Tensor | None = None
              ) -> torch.Tensor:
    """(B, T) per-token values -> a scalar, as ``mode`` says (see the module docstring). Divisors default to this
    batch's own: its tokens, its rows with a token, and its rows x T."""
    if mode == "token_mean":
        return (x * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)
    if mode == "sequence_mean":
        lengths = mask.sum(dim=1)
        per_sequence = (x * mask).sum(dim=1) / lengths.clamp(min=1)
        return per_sequence.sum() / ((lengths > 0).sum().clamp(min=1) if num_sequences is None else num_sequences)
    if mode == "token_sum":
        return (x * mask).sum() / (mask.numel() if constant is None else constant)
    raise ValueError(f"unknown loss aggregation {mode!r}: use {', '.join(AGGREGATIONS)}")
