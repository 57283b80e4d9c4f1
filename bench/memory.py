"""Peak memory of a PPO iteration by model size, for LoRA x {full precision, 8-bit, 4-bit} x ZeRO stage.

    python bench/memory.py                                   # CPU: tiny model, 2 CPU ranks for ZeRO
    python bench/memory.py --models gpt2 1b --ranks 1        # one GPU (bf16 base); --ranks 8 on 8 GPUs

Each cell is a real run of ``launch/ppo.py`` (two PPO iterations, rollout + update) in its own process,
under the deepspeed launcher for the ZeRO cells. The figure is the ``memory/peak_gib`` metric the trainer
logs: peak allocated GPU memory on CUDA, peak resident memory of the process on CPU (which includes
Python, torch and the libraries, ~0.5 GiB), averaged over ranks. Models are GPT-2s built from a config with
random weights and a GPT-2-sized vocabulary (nothing is downloaded). Combinations llmrl refuses at
start-up (bitsandbytes with ZeRO-3) are listed as refused. Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_models import SIZES, build  # noqa: E402

STAGES = ["single", "zero0", "zero2", "zero3"]
QUANT = ["none", "8bit", "4bit"]


def build_model(name: str, folder: Path) -> Path:
    model, tokenizer = build(name)
    model.save_pretrained(folder / name)
    tokenizer.save_pretrained(folder / name)
    return folder / name


def run_cell(model_dir: Path, run_dir: Path, stage: str, quant: str, ranks: int, args) -> dict:
    overrides = [f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}", "train.total_steps=2",
                 f"train.rollout_batch_size={args.rollout}", f"train.mini_batch_size={args.rollout}",
                 f"train.micro_batch_size={args.micro}", "train.epochs=1", "run.eval_every=0",
                 "run.progress=false", "data.eval_size=8", f"generation.max_new_tokens={args.new_tokens}",
                 f"model.dtype={args.dtype}"]
    if quant != "none":
        overrides.append(f"model.quantization={quant}")
    if args.gradient_checkpointing:
        overrides.append("model.gradient_checkpointing=true")
    if stage == "single":
        head = [sys.executable, str(REPO / "launch" / "ppo.py")]
    else:
        overrides.append(f"deepspeed.zero_stage={stage[-1]}")
        head = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(29400 + os.getpid() % 500),
                str(REPO / "launch" / "ppo.py")]
    out = subprocess.run([*head, "--config", str(REPO / "configs" / "tiny.yaml"), *overrides], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    if out.returncode != 0:
        text = out.stderr + out.stdout
        refused = "cannot be used with ZeRO-3" in text
        reason = "refused at start-up" if refused else text.strip().splitlines()[-1][:120] if text.strip() else "failed"
        return {"peak_gib": None, "status": reason}
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if "memory/peak_gib" in line]
    return {"peak_gib": rows[-1]["memory/peak_gib"], "status": "ok",
            "step_seconds": rows[-1]["time/step"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=["gpt2", "1b"] if cuda else ["tiny"], choices=sorted(SIZES))
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--quantization", nargs="+", default=QUANT, choices=QUANT)
    parser.add_argument("--ranks", type=int, default=1 if cuda else 2, help="ranks of the ZeRO cells")
    parser.add_argument("--rollout", type=int, default=64 if cuda else 16, help="global rollout batch")
    parser.add_argument("--micro", type=int, default=None, help="per rank; default rollout / ranks")
    parser.add_argument("--new-tokens", type=int, default=128 if cuda else 8)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.micro = args.micro or args.rollout // args.ranks  # one microbatch per rank: ZeRO-3 allows no accumulation

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            model_dir = build_model(name, tmp)
            for quant in args.quantization:
                for stage in args.stages:
                    ranks = 1 if stage == "single" else args.ranks
                    cell = run_cell(model_dir, tmp / f"{name}-{quant}-{stage}", stage, quant, ranks, args)
                    results.append({"model": name, "quantization": quant, "stage": stage, "ranks": ranks, **cell})
                    shown = f"{cell['peak_gib']:.3f} GiB" if cell["peak_gib"] is not None else cell["status"]
                    print(f"{name} {quant} {stage}: {shown}", file=sys.stderr)

    device = torch.cuda.get_device_name() if cuda else "CPU"
    what = "peak allocated GPU memory" if cuda else "peak resident memory per process"
    print(f"\n{what} (GiB, mean over ranks) on {device}; LoRA r=16 on every linear layer (configs/tiny.yaml); {args.dtype} base unless "
          f"quantized; rollout {args.rollout}, {args.new_tokens} new tokens, micro batch {args.micro} per rank\n")
    print("| model | base | " + " | ".join(f"{s} ({args.ranks} ranks)" if s != "single" else s for s in args.stages) + " |")
    print("|---|---|" + "---|" * len(args.stages))
    for name in args.models:
        for quant in args.quantization:
            cells = {r["stage"]: r for r in results if r["model"] == name and r["quantization"] == quant}
            shown = [f"{cells[s]['peak_gib']:.3f}" if cells[s]["peak_gib"] is not None else cells[s]["status"]
                     for s in args.stages]
            print(f"| {name} | {args.dtype if quant == 'none' else quant} | " + " | ".join(shown) + " |")
    out = Path(args.out or REPO / "bench" / "results" / f"memory_{'cuda' if cuda else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "measure": what, "settings": vars(args), "cells": results},
                              indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
