"""Each distinct prompt of a batch encoded once, and the text every prompt starts with encoded once.

In RLHF batches the prompts repeat themselves: GRPO, RLOO and REINFORCE sample k completions of each prompt,
and a chat template puts the same system prompt at the start of every conversation (SmolLM2's default is
about 30 of a 40-token prompt). Encoding the full prompt for every row repeats that work in the rollout's
prefill, in the log-prob passes and, with gradients, in every update. Here the forward pass is split in three:

1. the shared prefix (the token ids every prompt of the batch starts with), one row;
2. each distinct prompt's remaining tokens (left-padded), against the prefix's keys and values;
3. each row's response tokens, against its prompt's cached keys and values.

Attention masks cover every key (the padding between prefix and suffix is masked out) and position ids count
real tokens, so every row sees exactly the keys and positions it would alone: the logits and values equal the
plain forward's up to float rounding (tested). Keys and values are gathered per row by differentiable
indexing, so the same path serves the update with gradients.

Not used with gradient checkpointing in a grad-enabled pass (recomputing a layer would append to the cache
twice) nor for caches other than transformers' ``DynamicCache``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SHARED_PREFIX = 4  # fewer shared tokens than this are not worth a separate forward pass


@dataclass
class PromptPlan:
    """How the prompts of a (B, P) left-padded batch are encoded once each."""

    prefix: torch.Tensor  # (C,) token ids every prompt starts with (C may be 0)
    suffix: torch.Tensor  # (U, S) ids of each distinct prompt after the prefix, left-padded
    suffix_mask: torch.Tensor  # (U, S) 1 on real tokens
    row_prompt: torch.Tensor  # (B,) which distinct prompt each row holds
    lengths: torch.Tensor  # (B,) real prompt tokens of each row (C + its suffix)


def plan_prompts(query: torch.Tensor, query_mask: torch.Tensor) -> PromptPlan | None:
    """The plan for ``query`` (B, P) and ``query_mask`` (B, P), or None when no work would be saved (every
    prompt distinct and fewer than ``MIN_SHARED_PREFIX`` tokens in common).

    >>> q = torch.tensor([[0, 5, 6, 7], [5, 6, 8, 9], [0, 5, 6, 7], [5, 6, 7, 9]])
    >>> m = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    >>> p = plan_prompts(q, m)  # 2 tokens in common, fewer than MIN_SHARED_PREFIX: no prefix, 3 distinct prompts
    >>> p.prefix.tolist(), p.suffix.tolist(), p.suffix_mask.tolist()
    ([], [[0, 5, 6, 7], [5, 6, 8, 9], [5, 6, 7, 9]], [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    >>> p.row_prompt.tolist(), p.lengths.tolist()
    ([0, 1, 0, 2], [3, 4, 3, 4])
    """
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(query, query_mask)]
    distinct: dict[tuple, int] = {}
    row_prompt = [distinct.setdefault(tuple(r), len(distinct)) for r in rows]
    prompts = [list(p) for p in distinct]
    # The prefix leaves every distinct prompt at least one token of its own: the last prompt position's logits
    # and hidden state (which predict the first response token) come from the suffix pass.
    limit = min(len(p) for p in prompts) - 1
    common = 0
    while common < limit and all(p[common] == prompts[0][common] for p in prompts):
        common += 1
    if common < MIN_SHARED_PREFIX:
        common = 0
    if common == 0 and len(prompts) == len(rows):
        return None
    suffix, suffix_mask = _left_padded([p[common:] for p in prompts], query.device, query.dtype)
    return PromptPlan(prefix=torch.tensor(prompts[0][:common], dtype=query.dtype, device=query.device),
                      suffix=suffix, suffix_mask=suffix_mask.to(query_mask.dtype),
                      row_prompt=torch.tensor(row_prompt, device=query.device),
                      lengths=torch.tensor([len(r) for r in rows], device=query.device))


def _left_padded(seqs: list[list[int]], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=dtype, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=dtype, device=device)
            mask[i, width - len(s):] = 1
    return ids, mask


@dataclass
class EncodedPrompts:
    """The cache and outputs of ``encode_prompts``, one row per batch row."""

    cache: object  # transformers DynamicCache holding each row's prompt keys and values
    key_mask: torch.Tensor  # (B, C + S) 1 where a cached key is a real token
    last_logits: torch.Tensor  # (B, V) logits at each row's last prompt position
    last_hidden: torch.Tensor | None  # (B, H) last layer's hidden state there (with ``hidden``)
    lengths: torch.Tensor  # (B,) real prompt tokens: the position of each row's first response token


def encode_prompts(model, plan: PromptPlan, cache_kw: str, keeps_logits: bool, hidden: bool = False
                   ) -> EncodedPrompts | None:
    """Passes 1 and 2 of the module docstring, the cache then gathered to one row per batch row; None when the
    model's cache cannot be gathered by row (not a transformers ``Cache``)."""
    U = plan.suffix.shape[0]
    C = plan.prefix.shape[0]
    device = plan.suffix.device
    cache = None
    if C:
        out = model(input_ids=plan.prefix[None], attention_mask=torch.ones(1, C, dtype=plan.suffix_mask.dtype,
                                                                           device=device),
                    position_ids=torch.arange(C, device=device)[None], use_cache=True,
                    **_last_only(keeps_logits, C, device))
        cache = cache_of(out)
        if not hasattr(cache, "batch_select_indices"):
            return None
        cache.batch_select_indices(torch.zeros(U, dtype=torch.long, device=device))
    key_mask = torch.cat([torch.ones(U, C, dtype=plan.suffix_mask.dtype, device=device), plan.suffix_mask], 1)
    positions = (C + plan.suffix_mask.cumsum(1) - 1).clamp(min=0)
    S = plan.suffix.shape[1]
    out = model(input_ids=plan.suffix, attention_mask=key_mask, position_ids=positions, use_cache=True,
                output_hidden_states=hidden, **_last_only(keeps_logits, S, device), **{cache_kw: cache})
    cache = cache_of(out)
    if not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(plan.row_prompt)
    rows = plan.row_prompt
    last_hidden = out.hidden_states[-1][:, -1][rows] if hidden else None
    return EncodedPrompts(cache, key_mask[rows], out.logits[:, -1][rows], last_hidden, plan.lengths)


def _last_only(keeps_logits: bool, length: int, device) -> dict:
    """``logits_to_keep`` for the last position only, where the model takes it (as indices: see
    ``llmrl.models.forward.last_positions``)."""
    return {"logits_to_keep": torch.tensor([length - 1], device=device)} if keeps_logits else {}


def cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def response_outputs(model, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                     response_mask: torch.Tensor, cache_kw: str, keeps_logits: bool, hidden: bool = False):
    """(logits (B, T, V) predicting each response token, last-layer hidden states (B, T, H) at the positions
    that predict them, or None) through the shared-prompt passes; None when ``plan_prompts`` finds nothing
    to share (the caller then runs the plain forward)."""
    plan = plan_prompts(query, query_mask)
    if plan is None:
        return None
    enc = encode_prompts(model, plan, cache_kw, keeps_logits, hidden)
    if enc is None:
        return None
    logits, states = [enc.last_logits[:, None]], [enc.last_hidden[:, None]] if hidden else None
    T = response.shape[1]
    if T > 1:  # the last response token predicts nothing: it need not be fed
        fed, fed_mask = response[:, :-1], response_mask[:, :-1].to(enc.key_mask.dtype)
        out = model(input_ids=fed, attention_mask=torch.cat([enc.key_mask, fed_mask], 1),
                    position_ids=enc.lengths[:, None] + torch.arange(T - 1, device=fed.device), use_cache=True,
                    output_hidden_states=hidden, **{cache_kw: enc.cache})
        logits.append(out.logits)
        if hidden:
            states.append(out.hidden_states[-1])
    return torch.cat(logits, 1), torch.cat(states, 1) if hidden else None
