"""The output layer on the last positions only: ``logits_to_keep`` as an int (transformers slices a strided
view of the hidden states) against indices (a contiguous copy), which llmrl passes.

    python bench/logits_slice.py                 # CPU, float32 and bfloat16
    python bench/logits_slice.py --threads 1     # as the PPO-iteration benchmark's workers run

Two rows per dtype: the bare output layer (rows x hidden -> vocab, GPT-2's shape) on a strided slice vs a
contiguous copy (no autograd, as in rollouts and the old/reference log-prob passes), and a whole forward of GPT-2 124M (random weights, LoRA-wrapped as llmrl trains it) with
``logits_to_keep`` = int vs indices. Checks that both give the same logits. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_models import build, median_seconds  # noqa: E402
from llmrl.config import LoraConfig  # noqa: E402
from llmrl.models.policy import add_lora  # noqa: E402
from llmrl.models.forward import last_positions  # noqa: E402


def seconds(fn, repeats: int, device) -> float:
    fn()  # warm-up
    return median_seconds(fn, repeats, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=24, help="sequence length of the forward")
    parser.add_argument("--keep", type=int, default=9, help="last positions whose logits are kept")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, L, K = args.batch, args.length, args.keep
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model = add_lora(build("gpt2")[0].to(device=device, dtype=dtype), LoraConfig(r=16, alpha=32)).eval()
        head = model.get_output_embeddings().weight.detach()
        hidden = torch.randn(B, L, head.shape[1], device=device, dtype=dtype)
        strided, copied = hidden[:, -K:], hidden[:, -K:].contiguous()
        linear = torch.nn.functional.linear
        same = torch.equal(linear(strided, head), linear(copied, head))
        rows.append((name, f"output layer, {B}x{K} rows", seconds(lambda: linear(strided, head), args.repeats, device),
                     seconds(lambda: linear(copied, head), args.repeats, device), same))

        ids = torch.randint(3, 50_000, (B, L), device=device)
        index = last_positions(K, L, device)
        with torch.no_grad():
            same = torch.equal(model(input_ids=ids, logits_to_keep=K).logits,
                               model(input_ids=ids, logits_to_keep=index).logits)
            rows.append((name, f"GPT-2 124M forward, {B}x{L}, keep {K}",
                         seconds(lambda: model(input_ids=ids, logits_to_keep=K), args.repeats, device),
                         seconds(lambda: model(input_ids=ids, logits_to_keep=index), args.repeats, device), same))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nlogits_to_keep as int vs indices on {where}, torch {torch.__version__}, median of {args.repeats}\n")
    print("| dtype | what | int (strided) s | indices (contiguous) s | int / indices | same logits |")
    print("|---|---|---|---|---|---|")
    for name, what, a, b, same in rows:
        print(f"| {name} | {what} | {a:.4f} | {b:.4f} | {a / b:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
