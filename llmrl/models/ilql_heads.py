"""ILQL's heads (Snell et al. 2022): token-level Q and V on the policy's last hidden state.

Two Q heads (each: hidden -> one value per vocabulary token), their Polyak-averaged target copies (never trained by
gradient), and a V head (hidden -> one value). The shape follows trlX's ILQLHeads (a two-layer MLP per head, hidden
width 2 x the model's): with LoRA the trunk's adapter is trained by the heads' losses too. The heads are saved with a
checkpoint as ``ilql_heads.safetensors`` and never exported with the model.

The learned policy samples from ``logits + beta * (Q_target(s, .) - V(s))`` (``shifted_logits``), beta chosen at
evaluation time.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

HEADS_FILE = "ilql_heads.safetensors"


def _mlp(hidden_size: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, out))


class FrozenLinear(nn.Module):
    """A linear layer whose weight and bias are buffers, not parameters: the Polyak targets' layers. No optimizer
    holds them, DeepSpeed ZeRO-3 does not partition them (each rank keeps the whole, updated alike from the gathered
    Q heads) and they are saved with the module's state, DeepSpeed's checkpoints included; the state-dict keys are
    those of an ``nn.Linear``."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _frozen_copy(head: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*(FrozenLinear(m) if isinstance(m, nn.Linear) else copy.deepcopy(m) for m in head))


def _run(head: nn.Sequential, hidden: torch.Tensor) -> torch.Tensor:
    """``head`` on ``hidden`` in the head's own dtype (the targets may be kept in float32 beside bf16 heads)."""
    return head(hidden.to(head[0].weight.dtype))


class ILQLHeads(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, two_qs: bool = True):
        super().__init__()
        self.q_heads = nn.ModuleList(_mlp(hidden_size, vocab_size) for _ in range(2 if two_qs else 1))
        self.target_q_heads = nn.ModuleList(_frozen_copy(head) for head in self.q_heads)  # buffers, never trained
        self.v_head = _mlp(hidden_size, 1)

    @torch.no_grad()
    def start_at_zero(self) -> None:
        """Every head's output layer to zero (weights and bias): Q = V = 0, so the learned policy starts as the LM
        itself at any beta (its evaluation before training is the base's), as llmrl's value head starts. The first
        layers stay random, so the two Q heads still learn apart."""
        for head in [*self.q_heads, *self.target_q_heads, self.v_head]:
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def forward(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(B, T, H) hidden states -> (the Q heads' values [(B, T, V)], the targets' minimum (B, T, V), no
        gradient, V (B, T))."""
        qs = [_run(head, hidden) for head in self.q_heads]
        with torch.no_grad():
            target = torch.stack([_run(head, hidden) for head in self.target_q_heads]).amin(0)
        return qs, target, _run(self.v_head, hidden).squeeze(-1)

    @torch.no_grad()
    def advantage(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> Q_target(s, a) - V(s) for every token a: (..., V)."""
        target = torch.stack([_run(head, hidden) for head in self.target_q_heads]).amin(0)
        return target - _run(self.v_head, hidden)

    @torch.no_grad()
    def sync_targets(self, alpha: float) -> None:
        """Polyak averaging: target <- alpha * Q + (1 - alpha) * target (alpha = 1 copies). Under ZeRO-3 the caller
        gathers the Q heads around it (``Strategy.gathered``)."""
        for head, target in zip(self.q_heads, self.target_q_heads):
            for p, t in zip(head.parameters(), target.buffers()):
                t.mul_(1.0 - alpha).add_(p.detach(), alpha=alpha)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: str | Path, device) -> None:
        """Weights from ``save`` (safetensors: no code runs); a file of another shape is refused with one line."""
        from safetensors.torch import load_file

        from llmrl.config import ConfigError

        state = load_file(str(path), device=str(device))
        mine = self.state_dict()
        wrong = sorted(set(state) ^ set(mine)) or [k for k in mine if state[k].shape != mine[k].shape]
        if wrong:
            raise ConfigError(f"{path} does not fit this model's ILQL heads (e.g. {wrong[0]}): it was saved for "
                              f"another model or ilql.two_qs setting; resume with the run's own model")
        self.load_state_dict(state)


def shifted_logits(logits: torch.Tensor, advantage: torch.Tensor, beta: float) -> torch.Tensor:
    """ILQL's policy: the LM's logits shifted by beta * (Q - V). Shapes (..., V); beta = 0 is the LM itself."""
    return logits.float() + beta * advantage.float()
