"""Rollout: sample completions, cut them at the stop token, and hold everything PPO needs in one batch."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from llmrl.config import GenerationConfig
from llmrl.rollout.engine import RolloutEngine, Sampling


@dataclass
class Experience:
    """One rollout. P: prompt length (left-padded), T: response length (right-padded after EOS)."""

    query: torch.Tensor  # (B, P) prompt token ids, left padded
    query_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response: torch.Tensor  # (B, T) sampled token ids, pad after the stop token
    response_mask: torch.Tensor  # (B, T) float, 1 on real response tokens (the EOS included): what is attended to
    # (B, T) float, 1 on the tokens to train on: the model's own (a multi-turn episode's environment tokens are 0,
    # and the trainer zeroes samples it drops). None: every real response token (one sampled completion).
    action_mask: torch.Tensor | None = None
    # (B, T) the environment's per-turn rewards at the last token of each model turn (multi-turn episodes; their
    # row sums are the raw scores); None: the whole score belongs at the last token.
    step_rewards: torch.Tensor | None = None
    ended: torch.Tensor | None = None  # (B,) bool, whether the response emitted the stop token or a stop string
    logprobs: torch.Tensor | None = None  # (B, T) log pi_old(a_t|s_t), logits / temperature (0 after EOS)
    entropy: torch.Tensor | None = None  # (B, T) entropy of pi_old(.|s_t) (from the sampler, when it gives it)
    # (B, T) the sampler's own log-probs when the trainer recomputed ``logprobs`` (to compare, and for truncated
    # importance sampling); None when the sampler recorded none or they are ``logprobs`` themselves
    sampler_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None  # (B, T) log pi_ref(a_t|s_t), adapter disabled
    values: torch.Tensor | None = None  # (B, T) V(s_t) at rollout time
    scores: torch.Tensor | None = None  # (B,) sequence reward after EOS penalty and clipping
    advantages: torch.Tensor | None = None  # (B, T) whitened GAE advantages
    returns: torch.Tensor | None = None  # (B, T) advantages + values (before whitening)

    @property
    def loss_mask(self) -> torch.Tensor:  # (B, T) the tokens losses, KL and advantages count
        return self.response_mask if self.action_mask is None else self.response_mask * self.action_mask

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)

    @property
    def lengths(self) -> torch.Tensor:  # (B,) real prompt + response tokens
        return self.query_mask.sum(1) + self.response_mask.sum(1)

    def trimmed(self) -> "Experience":
        """The same rows without the columns that are padding in every row: left of the prompts, right of
        the responses. Positions come from the attention mask, so the model computes the same numbers."""
        first = int(self.query_mask.any(0).float().argmax())  # the first column holding a real prompt token
        last = int(self.response_mask.any(0).nonzero().max()) + 1 if self.response_mask.any() else 1
        trimmed = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value.dim() == 2:
                value = value[:, first:] if f.name.startswith("query") else value[:, :last]
            trimmed[f.name] = value
        return Experience(**trimmed)

    def select(self, index: torch.Tensor) -> "Experience":
        """The sub-batch at ``index`` (B',) of every tensor field."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})


def right_padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ((B, N) ids right-padded with ``pad_token_id``, (B, N) float mask of the real ones)."""
    width = max(1, max(len(seq) for seq in sequences))
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1.0
    return ids, mask


def left_padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ((B, N) ids left-padded with ``pad_token_id``, (B, N) long mask of the real ones)."""
    width = max(1, max(len(seq) for seq in sequences))
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def stop_criteria(tokenizer, stop: list[str]):
    """``generation.stop`` as transformers' ``StopStringCriteria``: (B, L) ids -> (B,) bool, whether the ids end
    with one of the strings (None when there are none). The same rule cuts every engine's completions."""
    if not stop:
        return None
    from transformers.generation.stopping_criteria import StopStringCriteria

    criteria = StopStringCriteria(tokenizer, stop)
    return lambda ids: criteria(ids, None)


def stop_positions(context: torch.Tensor, response: torch.Tensor, stopped) -> torch.Tensor:
    """(B, T) bool: True at each response token that completes a stop string (``stopped``: ``stop_criteria``),
    read over the ``context`` (B, C) and the response so far, as the engines check while they decode."""
    ids = torch.cat([context, response], dim=1)
    C = context.shape[1]
    return torch.stack([stopped(ids[:, :C + t + 1]) for t in range(response.shape[1])], dim=1) \
        if response.shape[1] else torch.zeros_like(response, dtype=torch.bool)


def truncate_at_eos(response: torch.Tensor, eos_token_id: int, pad_token_id: int,
                    stops: torch.Tensor | None = None):
    """(B, T) sampled ids -> (ids with pad after the first EOS, float mask up to and including it, has_eos (B,)).
    ``stops`` (B, T) bool: further positions that end a completion the same way (a stop string's last token)."""
    is_eos = response == eos_token_id
    if stops is not None:
        is_eos = is_eos | stops
    has_eos = is_eos.any(dim=1)
    T = response.shape[1]
    first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))
    positions = torch.arange(T, device=response.device).unsqueeze(0)
    mask = positions <= first_eos.unsqueeze(1)
    return torch.where(mask, response, torch.full_like(response, pad_token_id)), mask.float(), has_eos


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: GenerationConfig, device: torch.device,
             greedy: bool = False, synced_gpus: bool = False, engine: RolloutEngine | None = None,
             all_finished: Callable[[torch.Tensor], bool] | None = None,
             shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Experience:
    """Sample (or greedily decode) completions of ``prompts`` with ``model`` (the adapter enabled).

    ``engine`` (llmrl's decode loop) when given, else ``model.generate``. ``synced_gpus``: every rank keeps
    decoding until all ranks have finished (ZeRO-3 fetching weights inside each forward), which
    ``all_finished`` (the strategy's ``all_ranks_finished``) tells the engine. With the engine and
    sampling, ``logprobs`` and ``entropy`` hold log pi(a_t|s_t) of the sampled tokens and the entropy of the
    distribution they were sampled from (logits / temperature; equal to a recomputed forward's within float
    rounding: tested). ``shift``: the engine chooses tokens from shifted logits (``RolloutEngine.generate``;
    ILQL's policy: ``llmrl.rollout.ilql``), and ``logprobs``/``entropy`` are those of the distribution sampled from.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokens, sampled = decode(model, tokenizer, enc["input_ids"], enc["attention_mask"], cfg, cfg.max_new_tokens,
                             greedy, synced_gpus, engine, all_finished, shift)
    response, response_mask, ended = truncate_at_eos(tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                     stops_of(tokenizer, cfg, enc["input_ids"], tokens))
    exp = Experience(query=enc["input_ids"], query_mask=enc["attention_mask"], response=response,
                     response_mask=response_mask, ended=ended)
    if sampled is not None:  # the engine's log-probs, and entropies where it gives them (vLLM does not)
        exp.logprobs, exp.entropy = (None if x is None else x * response_mask for x in sampled)
    return exp


@torch.no_grad()
def generate_ids(model, tokenizer, contexts: list[list[int]], cfg: GenerationConfig, device: torch.device,
                 max_new_tokens: int, greedy: bool = False, synced_gpus: bool = False,
                 engine: RolloutEngine | None = None, all_finished: Callable[[torch.Tensor], bool] | None = None
                 ) -> list[list[int]]:
    """Continue token-id ``contexts`` (a multi-turn episode so far, never re-tokenised): the sampled ids of
    each, up to and including the stop token."""
    ids, mask = left_padded(contexts, tokenizer.pad_token_id)
    tokens, _ = decode(model, tokenizer, ids.to(device), mask.to(device), cfg, max_new_tokens, greedy, synced_gpus,
                       engine, all_finished)
    response, response_mask, _ = truncate_at_eos(tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                 stops_of(tokenizer, cfg, ids.to(device), tokens))
    return [row[m.bool()].tolist() for row, m in zip(response.cpu(), response_mask.cpu())]


def stops_of(tokenizer, cfg: GenerationConfig, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
    """(B, N) bool where a ``generation.stop`` string completes in ``tokens`` after ``context``; None without any."""
    stopped = stop_criteria(tokenizer, cfg.stop)
    return None if stopped is None else stop_positions(context, tokens, stopped)


def sampling_of(cfg: GenerationConfig, greedy: bool) -> Sampling:
    return Sampling(greedy=greedy, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                    repetition_penalty=cfg.repetition_penalty)


def generate_arguments(cfg: GenerationConfig, greedy: bool, tokenizer) -> dict:
    """``model.generate`` keywords for the generation settings: transformers applies the repetition penalty
    (greedy too), temperature, top-k, top-p and min-p in that order, and the stop strings as a stopping rule."""
    kwargs = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
        min_p=cfg.min_p or None)
    if cfg.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = cfg.repetition_penalty
    if cfg.stop:
        kwargs.update(stop_strings=list(cfg.stop), tokenizer=tokenizer)
    return kwargs


def decode(model, tokenizer, input_ids, attention_mask, cfg: GenerationConfig, max_new_tokens: int, greedy: bool,
           synced_gpus: bool, engine: RolloutEngine | None, all_finished, shift=None):
    """(sampled tokens (B, N), (log-probs, entropy) the engine recorded or None) of a left-padded batch."""
    greedy = greedy or not cfg.do_sample
    sampled = None  # (log-probs, entropy) the engine recorded while sampling
    if shift is not None and not isinstance(engine, RolloutEngine):
        raise ValueError("shifted logits (ILQL) need llmrl's decode loop: pass a RolloutEngine")
    if engine is not None:
        stop = {"stopped": stop_criteria(tokenizer, cfg.stop)} if cfg.stop else {}  # vLLM's takes cfg.stop itself
        if shift is not None:
            stop["shift"] = shift
        tokens, *sampled = engine.generate(model, input_ids, attention_mask, max_new_tokens,
                                           sampling_of(cfg, greedy), all_finished=all_finished if synced_gpus else None,
                                           with_entropy=True, **stop)
        if greedy or sampled[0] is None:  # greedy decoding scores the raw logits, not logits / temperature
            sampled = None
    else:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus,
            **generate_arguments(cfg, greedy, tokenizer))
        tokens = out[:, input_ids.shape[1]:]
    return tokens, sampled


def decode_completions(tokenizer, exp: Experience) -> list[str]:
    """Completion texts, without the stop token and padding."""
    return tokenizer.batch_decode(exp.response, skip_special_tokens=True)
