"""Sampling from ILQL's learned policy (Snell et al. 2022, section 4.3; trlX's ``AutoModelForCausalLMWithILQLHeads
.generate``): at every step the LM's logits are shifted by ``beta * (Q(s, .) - V(s))``, the heads read on the same
forward pass's last hidden state, and the token is chosen from the shifted logits: their argmax (greedy), or a draw
from ``softmax(shifted / temperature)`` restricted to its ``top_k`` likeliest tokens (the paper's and trlX's 20).

trlX shifts ``log_softmax(logits)`` rather than the logits: the same distribution, as the two differ by a constant
per position. ``beta = 0`` is the LM (with the trained adapter) alone.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from llmrl.config import ConfigError, GenerationConfig
from llmrl.models.ilql_heads import ILQLHeads, shifted_logits
from llmrl.rollout.engine import RolloutEngine
from llmrl.rollout.experience import Experience, generate


@dataclass
class ILQLShift:
    """The decode loop's ``shift``: (B, V) logits and (B, H) last-layer hidden state -> logits + beta * (Q - V)."""

    heads: ILQLHeads
    beta: float

    def __call__(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return shifted_logits(logits, self.heads.advantage(hidden), self.beta)


def check_sampling(beta: float, top_k: int) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ConfigError(f"ilql.beta = {beta!r} must be a finite number (0 samples the LM alone; the default is 4)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ConfigError(f"ilql.top_k = {top_k!r} must be a whole number >= 0 (0 keeps every token; the default is "
                          f"20)")


@torch.no_grad()
def ilql_generate(model, heads: ILQLHeads, tokenizer, prompts: list[str], beta: float, top_k: int,
                  greedy: bool = False, max_new_tokens: int | None = None, cfg: GenerationConfig | None = None,
                  device: torch.device | None = None, engine: RolloutEngine | None = None, synced_gpus: bool = False,
                  all_finished=None) -> Experience:
    """Completions of ``prompts`` by ILQL's policy: ``model`` (the LM with its trained adapter) and ``heads``.

    ``cfg`` (default: ``GenerationConfig()``) gives the temperature, stop strings, top-p, min-p and the
    repetition penalty; ``top_k`` replaces its top_k and ``max_new_tokens``, when given, its max_new_tokens.
    Greedy (or ``cfg.do_sample`` false): the argmax of the shifted logits. ``engine``: llmrl's decode loop to use
    (a plain one when None or not a ``RolloutEngine``: ILQL never decodes with ``model.generate`` or vLLM, which
    cannot read the heads). The returned ``logprobs``/``entropy`` (sampling only) are those of the distribution each
    token was drawn from: the shifted logits / temperature, top-k (top-p, min-p) filtered.
    """
    check_sampling(beta, top_k)
    cfg = cfg or GenerationConfig()
    cfg = dataclasses.replace(cfg, top_k=top_k,
                              max_new_tokens=cfg.max_new_tokens if max_new_tokens is None else max_new_tokens)
    if not isinstance(engine, RolloutEngine):
        engine = RolloutEngine(tokenizer.eos_token_id, tokenizer.pad_token_id)
    device = device if device is not None else model.get_input_embeddings().weight.device
    return generate(model, tokenizer, prompts, cfg, device, greedy=greedy, synced_gpus=synced_gpus, engine=engine,
                    all_finished=all_finished, shift=ILQLShift(heads, float(beta)))
