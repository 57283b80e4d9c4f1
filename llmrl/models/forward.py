"""How to call a causal LM's forward: the keyword it takes the KV cache by, and which positions to keep logits
for. Used by the policy (models) and the decode loop (rollout), so it sits below both."""
from __future__ import annotations

import inspect

import torch


def forward_arguments(model) -> tuple[str, bool]:
    """(the keyword the model's forward takes the KV cache by, whether it takes ``logits_to_keep``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values", "logits_to_keep" in params


def last_positions(n: int, length: int, device) -> torch.Tensor:
    """``logits_to_keep`` for the last ``n`` of ``length`` positions, as indices rather than the int ``n``.

    With an int, transformers feeds the output layer a strided view of the hidden states; with indices, a
    contiguous copy. Same logits, but on a CPU a bf16 linear layer without autograd takes a slow path on the
    strided view: GPT-2's output layer on 8 x 9 rows took 1.84 s instead of 0.033 s (torch 2.13, 1 thread,
    bench/logits_slice.py).
    """
    return torch.arange(max(length - n, 0), length, device=device)
