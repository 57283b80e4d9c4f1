"""Where the trainer touches devices and processes: one small object (OpenRLHF's "strategy" pattern).

``SingleProcess`` runs on one CPU or GPU. A DeepSpeed strategy with the same methods plugs in here; the
trainer calls only these methods, so the single-process path runs the same training code.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from llmrl.config import ConfigError


class SingleProcess:
    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str = "auto", threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("run.device = 'cuda' but no CUDA device is visible: use 'cpu' or 'auto'")
        self.device = torch.device(device)

    def seed_everything(self, seed: int) -> None:
        """Seeds differ per rank (seed + rank) so that ranks sample different completions."""
        s = seed + self.rank
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer, scheduler, params, max_grad_norm: float) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""
        if max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def barrier(self) -> None:
        pass

    def rng_state(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
