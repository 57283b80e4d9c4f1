"""The benchmarks' models (GPT-2s built from a config with random weights, so nothing is downloaded) and timer.

The character tokenizer covers the string tasks; for the GPT-2-sized models its vocabulary is padded to
GPT-2's 50,257 tokens, so that the output layer (often the largest single cost) is realistically wide.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmrl.data.tasks import SEPARATOR  # noqa: E402
from llmrl.demo.tiny import char_tokenizer, tiny_gpt2  # noqa: E402

SIZES = {  # name -> GPT-2 shape; vocab None: just the task's characters
    # almost no arithmetic: what remains is the per-token overhead that dominates a GPU's decode (a CPU proxy)
    "micro": dict(n_layer=1, n_embd=16, n_head=1, n_positions=256, vocab=None),
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab=None),  # configs/tiny.yaml's shape
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab=50257),  # GPT-2 124M
    "1b": dict(n_layer=24, n_embd=2048, n_head=16, n_positions=1024, vocab=50257),  # ~1.3B
}


def build(name: str, seed: int = 0):
    """(GPT2LMHeadModel with random weights, its tokenizer) of size ``name``."""
    shape = dict(SIZES[name])
    tokenizer = char_tokenizer("abcdef" + SEPARATOR, vocab_size=shape.pop("vocab"))
    return tiny_gpt2(tokenizer, seed=seed, **shape), tokenizer


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``repeats`` calls of ``fn()`` (no warm-up), each timed to the end of the GPU's work."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
