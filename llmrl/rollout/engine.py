"""A lean decode loop for rollouts: the model's forward and a few tensor ops per token, nothing else.

``model.generate`` stays the reference (``generation.engine: generate``); this loop gives the same greedy
tokens and the same log-probs (tested). What it removes per token: the logits-processor and
stopping-criteria stacks (transformers' own repetition penalty, min-p and stop-string checks run only when
set), the re-preparation of model inputs and the full-vocabulary score copies.
Prompts are encoded once (prefill, keeping only the last position's logits) and each step feeds one token
per sequence against the KV cache. The attention mask and position ids are written into buffers allocated
once, sampling stays on the device, and the loop stops as soon as every sequence has emitted its stop token
(checked every ``sync_every`` steps on a GPU, where each check waits for the device).

With ``static=True`` the cache is transformers' ``StaticCache``, sized once for prompt + completion; it is
what ``compile=True`` needs: the one-token step is compiled with ``torch.compile`` (mode
"reduce-overhead", i.e. CUDA graphs on a GPU), so its shapes never change from token to token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                   TopKLogitsWarper, TopPLogitsWarper)

from llmrl.models.forward import forward_arguments, last_positions
from llmrl.models.prompt_cache import cache_of, encode_prompts, plan_prompts


@dataclass
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; applied to greedy decoding too, as generate does


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Top-k, nucleus (top-p), then min-p filtering of (B, V) logits, the rest set to -inf: transformers' own
    warpers in generate's order, so the fast engine keeps exactly the tokens ``generate`` keeps."""
    if top_k and top_k < logits.shape[-1]:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    if min_p > 0.0:
        logits = MinPLogitsWarper(min_p)(None, logits)
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None,
                penalty: Callable[[torch.Tensor], torch.Tensor] | None = None, sampled_distribution: bool = False):
    """(B, V) last-position logits -> (token ids (B,), their log-probs under logits / temperature (B,), the
    entropy of softmax(logits / temperature) (B,): the trainer's definitions, before the repetition penalty and
    top-k/top-p/min-p filtering, which only choose the token). ``penalty(logits)``: the repetition penalty,
    applied to the raw logits first, as generate's processor stack does.

    ``sampled_distribution``: when sampling, the log-probs and entropy are those of the distribution the token was
    actually drawn from (penalised, divided by the temperature, filtered), not the trainer's."""
    logits = logits.float()
    chosen = logits if penalty is None else penalty(logits.clone())
    if sampling.greedy:
        tokens = chosen.argmax(dim=-1)
        scaled = logits
    else:
        scaled = logits / sampling.temperature
        filtered = filter_logits(chosen / sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        tokens = torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(1)
        if sampled_distribution:
            scaled = filtered
            logz = scaled.logsumexp(dim=-1)
            probs = scaled.softmax(dim=-1)
            # filtered-out tokens are -inf with probability 0: they add nothing to the entropy (0 * -inf is nan)
            entropy = logz - torch.where(probs > 0, probs * scaled, torch.zeros_like(probs)).sum(-1)
            return tokens, scaled.gather(1, tokens[:, None]).squeeze(1) - logz, entropy
    logz = scaled.logsumexp(dim=-1)
    logprobs = scaled.gather(1, tokens[:, None]).squeeze(1) - logz
    entropy = logz - (scaled.softmax(dim=-1) * scaled).sum(-1)
    return tokens, logprobs, entropy


class RolloutEngine:
    """Decodes up to ``max_new_tokens`` for a left-padded batch; see the module docstring."""

    def __init__(self, eos_token_id: int, pad_token_id: int, static: bool = False, compile: bool = False,
                 sync_every: int | None = None, share_prompts: bool = False):
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.static = static or compile
        self.compile = compile
        # The prefill encodes each distinct prompt and the common prefix once (llmrl.models.prompt_cache); not with a
        # static cache, whose rows and positions are fixed up front.
        self.share_prompts = share_prompts and not self.static
        self.sync_every = sync_every
        self._compiled: dict[int, Callable] = {}  # id(model) -> compiled one-token step

    def _step_fn(self, model) -> Callable:
        if not self.compile:
            return model
        key = id(model)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(model, mode="reduce-overhead", fullgraph=False, dynamic=False)
        return self._compiled[key]

    def _new_cache(self, model, batch: int, length: int, device):
        if not self.static:
            return None  # the model starts a DynamicCache
        from transformers import StaticCache

        config = model.config
        try:
            return StaticCache(config=config, max_cache_len=length)
        except TypeError:  # older transformers name the batch size and device up front
            return StaticCache(config=config, max_batch_size=batch, max_cache_len=length, device=device,
                               dtype=model.dtype)

    @torch.no_grad()
    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 sampling: Sampling, generator: torch.Generator | None = None,
                 all_finished: Callable[[torch.Tensor], bool] | None = None, with_entropy: bool = False,
                 stopped: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        """(B, P) left-padded prompt -> (tokens (B, N), log-probs (B, N)), N <= max_new_tokens, and with
        ``with_entropy`` the entropy (B, N) of the distribution each token was sampled from.

        Tokens after a sequence's stop token are the pad id (log-prob and entropy 0). ``all_finished(finished)``
        decides when to stop (default: every sequence of this batch has finished); under DeepSpeed without
        gathered weights it must agree across ranks. ``stopped(ids)`` ((B, P + n) prompt and tokens so far ->
        (B,) bool): sequences that end here too (stop strings: transformers' ``StopStringCriteria``).

        ``shift(logits (B, V), hidden (B, H)) -> (B, V)``: the logits each token is chosen from, computed from the
        model's last-position logits and last-layer hidden state (ILQL's ``logits + beta * (Q - V)``:
        ``llmrl.rollout.ilql.ILQLShift``); the model is then run with ``output_hidden_states=True``. Greedy takes the
        argmax of the shifted logits; sampling divides them by the temperature, then filters (top-k, top-p, min-p).
        With a shift the log-probs and entropies returned are those of the distribution actually sampled from
        (the shifted logits / temperature, filtered; greedy: softmax of the shifted logits), not the LM's.
        """
        B, P = input_ids.shape
        device = input_ids.device
        cache_kw, keeps_logits = forward_arguments(model)
        # Ranks kept in step (``all_finished`` given: ZeRO-3 without gathered weights) encode prompts plainly: the
        # shared-prompt passes take one or two forwards depending on the prompts, and ZeRO-3's per-forward
        # collectives need the same count on every rank.
        plan = plan_prompts(input_ids, attention_mask) if self.share_prompts and all_finished is None else None
        hidden_kw = {"output_hidden_states": True} if shift is not None else {}
        encoded = encode_prompts(model, plan, cache_kw, keeps_logits, hidden=shift is not None) \
            if plan is not None else None
        if encoded is not None:  # the prompts' keys are laid out as prefix + padding + suffix: width K, not P
            prompt_mask, next_position, cache = encoded.key_mask, encoded.lengths, encoded.cache
            logits, hidden = encoded.last_logits, encoded.last_hidden
        else:
            prompt_mask = attention_mask
            next_position = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -1] + 1
            cache = self._new_cache(model, B, P + max_new_tokens, device)
        K = prompt_mask.shape[1]
        mask = torch.zeros(B, K + max_new_tokens, dtype=attention_mask.dtype, device=device)  # 1 where a key is real
        mask[:, :K] = prompt_mask
        tokens = torch.full((B, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        entropies = torch.zeros(B, max_new_tokens, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        all_finished = all_finished or (lambda done: bool(done.all()))
        # prompt and tokens so far, as generate holds them (pad after a stop): what the repetition penalty and the
        # stop strings read. The penalty skips each row's left padding, as generate's does.
        ids = None
        penalty = None
        if sampling.repetition_penalty != 1.0 or stopped is not None:
            ids = torch.cat([input_ids, tokens], dim=1)
        if sampling.repetition_penalty != 1.0:
            padding = (attention_mask != 0).int().argmax(dim=1)
            try:
                processor = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty,
                                                             prompt_ignore_length=padding)
            except TypeError:  # older transformers: no prompt_ignore_length, and its generate penalises padding too
                processor = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
            penalty = lambda logits: processor(ids[:, :P + n], logits)  # noqa: E731 (reads n as it grows)
        sync_every = self.sync_every or (8 if device.type == "cuda" else 1)

        if encoded is None:  # the prefill needs logits at the last position only: (B, V), not (B, P, V)
            keep = {"logits_to_keep": last_positions(1, P, device)} if keeps_logits else {}
            positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                        use_cache=True, **{cache_kw: cache}, **keep, **hidden_kw,
                        **({"cache_position": torch.arange(P, device=device)} if self.static else {}))
            logits, cache = out.logits[:, -1], cache_of(out)
            hidden = out.hidden_states[-1][:, -1] if shift is not None else None
        step = self._step_fn(model)
        n = 0
        while True:
            if shift is not None:
                logits = shift(logits, hidden)
            token, logprob, entropy = next_tokens(logits, sampling, generator, penalty,
                                                  sampled_distribution=shift is not None)
            token = token.masked_fill(finished, self.pad_token_id)
            tokens[:, n] = token
            logprobs[:, n] = logprob.masked_fill(finished, 0.0)
            entropies[:, n] = entropy.masked_fill(finished, 0.0)
            finished |= token == self.eos_token_id
            n += 1
            if ids is not None:
                ids[:, P + n - 1] = token
            if stopped is not None:
                finished |= stopped(ids[:, :P + n])
            if n == max_new_tokens or (n % sync_every == 0 and all_finished(finished)):
                break
            mask[:, K + n - 1] = 1  # the token fed now (a pad after the stop token, as generate feeds it)
            extra = {"cache_position": torch.tensor([K + n - 1], device=device)} if self.static else {}
            # A static cache keeps every shape fixed: the whole mask, zeros ahead of the current token.
            out = step(input_ids=token[:, None], attention_mask=mask if self.static else mask[:, :K + n],
                       position_ids=next_position[:, None], use_cache=True, **{cache_kw: cache}, **extra,
                       **hidden_kw)
            logits, cache = out.logits[:, -1], cache_of(out)
            hidden = out.hidden_states[-1][:, -1] if shift is not None else None
            next_position = next_position + 1
        if with_entropy:
            return tokens[:, :n], logprobs[:, :n], entropies[:, :n]
        return tokens[:, :n], logprobs[:, :n]
