"""Rollout: sample completions, cut them at the stop token, and hold everything PPO needs in one batch."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from llmrl.config import GenerationConfig


@dataclass
class Experience:
    """One rollout. P: prompt length (left-padded), T: response length (right-padded after EOS)."""

    query: torch.Tensor  # (B, P) prompt token ids, left padded
    query_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response: torch.Tensor  # (B, T) sampled token ids, pad after the stop token
    response_mask: torch.Tensor  # (B, T) float, 1 on real response tokens (the EOS included)
    logprobs: torch.Tensor | None = None  # (B, T) log pi_old(a_t|s_t), logits / temperature
    ref_logprobs: torch.Tensor | None = None  # (B, T) log pi_ref(a_t|s_t), adapter disabled
    values: torch.Tensor | None = None  # (B, T) V(s_t) at rollout time
    scores: torch.Tensor | None = None  # (B,) sequence reward after EOS penalty and clipping
    advantages: torch.Tensor | None = None  # (B, T) whitened GAE advantages
    returns: torch.Tensor | None = None  # (B, T) advantages + values (before whitening)

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)

    def select(self, index: torch.Tensor) -> "Experience":
        """The sub-batch at ``index`` (B',) of every tensor field."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})


def truncate_at_eos(response: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """(B, T) sampled ids -> (ids with pad after the first EOS, float mask up to and including it, has_eos (B,))."""
    is_eos = response == eos_token_id
    has_eos = is_eos.any(dim=1)
    T = response.shape[1]
    first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))
    positions = torch.arange(T, device=response.device).unsqueeze(0)
    mask = positions <= first_eos.unsqueeze(1)
    return torch.where(mask, response, torch.full_like(response, pad_token_id)), mask.float(), has_eos


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: GenerationConfig, device: torch.device,
             greedy: bool = False, **extra) -> Experience:
    """Sample (or greedily decode) completions of ``prompts`` with ``model`` (the adapter enabled)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    kwargs = dict(do_sample=False) if greedy or not cfg.do_sample else dict(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    out = model.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=cfg.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs, **extra,
    )
    P = enc["input_ids"].shape[1]
    response, response_mask, _ = truncate_at_eos(out[:, P:], tokenizer.eos_token_id, tokenizer.pad_token_id)
    return Experience(query=enc["input_ids"], query_mask=enc["attention_mask"],
                      response=response, response_mask=response_mask)


def decode_completions(tokenizer, exp: Experience) -> list[str]:
    """Completion texts, without the stop token and padding."""
    return tokenizer.batch_decode(exp.response, skip_special_tokens=True)


def has_eos(exp: Experience, eos_token_id: int) -> torch.Tensor:
    """(B,) whether each response ended with the stop token."""
    return (exp.response == eos_token_id).any(dim=1)
