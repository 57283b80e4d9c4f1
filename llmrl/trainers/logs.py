"""Logged answers for offline RL: sample a model's own answers to the training prompts, score them with the recipe's
reward and write them in the formats the offline trainers read (``llmrl log-answers``).

The model sampled is the recipe's starting policy: the base with the LoRA adapter disabled (or, with
``model.adapter``, the base with that adapter), at ``generation.temperature``, ``per_prompt`` answers per training
prompt. Held-out prompts (``data.eval_source``, the task's held-out split or the hashed share of ``data.source``)
are never logged. Each answer's reward is the one an RL run trains on: the recipe's reward, minus
``generation.missing_eos_penalty`` for an answer cut off at ``generation.max_new_tokens`` without EOS, clipped to
``reward.clip`` (no normalisation: a logged file has no running statistics). Four files and a summary:

- ``rewarded.jsonl``: ``{prompt, completion, reward}``, every answer kept (``ilql.data``; trlX's ILQL samples and
  rewards);
- ``labelled.jsonl``: ``{prompt, completion, label}``, label = reward >= threshold (``kto.data``; TRL's unpaired
  preference format);
- ``positives.jsonl``: ``{prompt, completion}``, the answers at or above the threshold (``sft.data``: filtered SFT,
  also called rejection-sampling fine-tuning);
- ``pairs.jsonl``: ``{prompt, chosen, rejected}``, for each prompt with answers on both sides of the threshold every
  (positive, negative) combination (``dpo.data``; TRL's preference format);
- ``summary.json``: the counts, the share of positives and the base's mean reward.

A conversational prompt (TRL's messages) is written as it is and its answer as one assistant message
``[{"role": "assistant", "content": ...}]`` (TRL's conversational format); a text prompt gets a text answer. An
answer the readers refuse (empty: EOS at once, nothing to learn from; or holding a NUL character) is counted as
unusable, not written; so is an answer the reward does not apply to (None, with ``reward.on_error: skip``).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch

from llmrl.config import Config, ConfigError
from llmrl.data.chat import as_completions, render_prompts
from llmrl.data.logged import completion_problem

__all__ = ["log_answers", "FILES", "DEFAULT_THRESHOLD"]

FILES = ("rewarded.jsonl", "labelled.jsonl", "positives.jsonl", "pairs.jsonl", "summary.json")
# A pass/fail rule scores 1.0 or 0.0 (minus the missing-EOS penalty): 0.5 puts every pass on the positive side and
# every fail on the negative side, and a partial credit above one half counts as a pass. A learned reward model's
# scores have their own scale: choose --threshold from them (e.g. their median, printed in the summary).
DEFAULT_THRESHOLD = 0.5


def log_answers(cfg: Config, out: str | Path, per_prompt: int, max_prompts: int | None = None,
                threshold: float = DEFAULT_THRESHOLD, overwrite: bool = False, batch_size: int = 64) -> dict:
    """Sample ``per_prompt`` answers to each training prompt of ``cfg`` (the first ``max_prompts`` of a random
    order fixed by ``run.seed``; all by default), score them and write the files above into folder ``out``.
    Returns the summary (also written to ``out/summary.json``). The same config and seed write the same files.

    Refuses, with one line, an ``out`` that already holds one of the files (unless ``overwrite``), an environment
    recipe (``env.name``: episodes are not logged yet) and a model whose base must still be built (the tiny recipe:
    ``llmrl log-answers`` builds it, as ``llmrl train`` does)."""
    from tqdm.auto import tqdm

    from llmrl.data.prompts import check_prompt_lengths, load_prompts, prompt_hash
    from llmrl.distributed.strategy import SingleProcess
    from llmrl.models.policy import build_policy, context_length
    from llmrl.packages import check_packages
    from llmrl.rewards.base import build_reward
    from llmrl.rollout.experience import decode_completions, generate
    from llmrl.trainers.base import make_engine

    check_arguments(per_prompt, max_prompts, threshold, batch_size)
    if cfg.env.name:
        raise ConfigError(f"env.name = {cfg.env.name!r}: log-answers logs single answers to prompts; episodes against "
                          f"an environment are not logged yet (use a recipe with data.source prompts)")
    out = Path(out)
    check_output(out, overwrite)
    started = time.perf_counter()
    check_packages(cfg)
    strategy = SingleProcess(cfg.run.device, cfg.run.threads)
    reward = build_reward(cfg.reward, strategy.device)
    column = cfg.data.prompt_column
    train_rows, eval_rows = load_prompts(cfg.data, cfg.env, say=lambda text: print(text, flush=True))
    reward.check_arguments(set(train_rows[0]) - {column}, cfg.data.source)
    held_out = {prompt_hash(r[column]) for r in eval_rows}
    candidates = [r for r in train_rows if prompt_hash(r[column]) not in held_out]  # never a held-out prompt
    order = list(range(len(candidates)))
    random.Random(cfg.run.seed).shuffle(order)
    rows = [candidates[i] for i in sorted(order[:max_prompts])]  # the chosen prompts, in the file's order
    if not rows:
        raise ConfigError(f"data.source = {cfg.data.source!r} has no training prompt left to log (every one is "
                          f"held out): add prompts or lower data.eval_size")

    strategy.seed_everything(cfg.run.seed)
    policy, tokenizer = build_policy(cfg.model, cfg.lora, strategy.device)
    context = context_length(policy.model)
    check_prompt_lengths(rows, column, tokenizer, cfg.data.max_prompt_length, cfg.generation.max_new_tokens, context,
                         "data.source")
    engine = make_engine(cfg, tokenizer, strategy, context)
    policy.eval()
    samples = [row for row in rows for _ in range(per_prompt)]  # a prompt's answers are consecutive
    answers: list[dict] = []  # {"prompt_index", "text", "raw", "ended"} for every sampled answer
    bar = tqdm(total=len(samples), desc="log-answers", unit="answer", disable=not cfg.run.progress,
               dynamic_ncols=True)
    # with model.adapter the recipe starts from that adapter: log it; otherwise the base, the adapter disabled
    sampled = contextlib.nullcontext() if cfg.model.adapter else policy.reference()
    with torch.no_grad(), sampled:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            prompts = [r[column] for r in batch]
            with strategy.generation_context(policy):
                exp = generate(policy.model, tokenizer, render_prompts(tokenizer, prompts), cfg.generation,
                               strategy.device, engine=engine, **strategy.generate_kwargs)
            texts = decode_completions(tokenizer, exp)
            extra = {k: [r[k] for r in batch] for k in batch[0] if k != column}
            ids = [r[m.bool()].tolist() for r, m in zip(exp.response, exp.response_mask)]
            result = reward(prompts, as_completions(prompts, texts), completion_ids=ids, **extra)
            for j, (text, score, valid, ended) in enumerate(zip(texts, result.scores, result.valid,
                                                                exp.ended.tolist())):
                answers.append({"prompt_index": (start + j) // per_prompt, "text": text,
                                "raw": float(score) if valid else None, "ended": bool(ended)})
            bar.update(len(batch))
    bar.close()
    files, summary = logged_files(rows, column, answers, cfg, threshold)
    summary.update({"model": cfg.model.name_or_path, "data": cfg.data.source, "per_prompt": per_prompt,
                    "temperature": cfg.generation.temperature, "max_new_tokens": cfg.generation.max_new_tokens,
                    "reward": reward.name, "seed": cfg.run.seed, "policy": "base (adapter disabled)"
                    if not cfg.model.adapter else f"base + adapter {cfg.model.adapter}",
                    "wall_seconds": round(time.perf_counter() - started, 2)})
    write_files(out, files, summary)
    return summary


def check_arguments(per_prompt, max_prompts, threshold, batch_size) -> None:
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise ConfigError(f"--per-prompt is {per_prompt!r}: give the number of answers to sample per prompt, 1 or more "
                          f"(pairs need 2 or more: one on each side of the threshold)")
    if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                    or max_prompts < 1):
        raise ConfigError(f"--prompts is {max_prompts!r}: give how many training prompts to log, 1 or more (leave it "
                          f"out to log every training prompt)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"--threshold is {threshold!r}: give a finite number (answers scoring at least this are "
                          f"positive; default {DEFAULT_THRESHOLD}, between a rule's fail 0 and pass 1)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size!r}: give the number of answers sampled at once, 1 or more")


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file: give a folder to write the logged answers into")
    present = [name for name in FILES if (out / name).exists()]
    if present and not overwrite:
        raise ConfigError(f"--out {str(out)!r} already holds {', '.join(present)}: pass --overwrite to replace "
                          f"them, or choose another folder")


def logged_files(rows: list[dict], column: str, answers: list[dict], cfg: Config,
                 threshold: float) -> tuple[dict[str, list[dict]], dict]:
    """The rows of the four files and the summary's counts, from every sampled answer (``prompt_index``: its row in
    ``rows``, ``text``,
    ``raw``: the reward's score or None where it does not apply, ``ended``: EOS was sampled)."""
    penalty = cfg.generation.missing_eos_penalty
    clip = cfg.reward.clip
    rewarded, labelled, positives, pairs = [], [], [], []
    by_prompt: dict[int, tuple[list, list]] = {}
    unusable = unscored = 0
    for a in answers:
        if a["raw"] is None:
            unscored += 1
            continue
        prompt = rows[a["prompt_index"]][column]
        completion = as_completions([prompt], [a["text"]])[0]
        if completion_problem(completion, prompt):  # empty, or a NUL character: the readers would refuse the file
            unusable += 1
            continue
        score = a["raw"] - (penalty if penalty is not None and not a["ended"] else 0.0)
        if clip is not None:
            score = min(max(score, -clip), clip)
        positive = score >= threshold
        rewarded.append({"prompt": prompt, "completion": completion, "reward": score})
        labelled.append({"prompt": prompt, "completion": completion, "label": positive})
        if positive:
            positives.append({"prompt": prompt, "completion": completion})
        by_prompt.setdefault(a["prompt_index"], ([], []))[0 if positive else 1].append(completion)
    for i in sorted(by_prompt):
        good, bad = by_prompt[i]
        pairs += [{"prompt": rows[i][column], "chosen": c, "rejected": r} for c in good for r in bad]
    scored = [a["raw"] for a in answers if a["raw"] is not None]
    rewards = sorted(r["reward"] for r in rewarded)
    summary = {
        "prompts": len(rows), "answers": len(answers), "written": len(rewarded), "unusable": unusable,
        "unscored": unscored, "unfinished": sum(not a["ended"] for a in answers),
        "threshold": threshold, "positives": len(positives), "negatives": len(rewarded) - len(positives),
        "positive_share": len(positives) / len(rewarded) if rewarded else math.nan,
        "pairs": len(pairs), "prompts_with_pairs": sum(bool(g and b) for g, b in by_prompt.values()),
        # the base model's mean reward: the rule's own scores of every scored answer, and the rewards written
        "mean_raw_reward": sum(scored) / len(scored) if scored else math.nan,
        "mean_reward": sum(rewards) / len(rewards) if rewards else math.nan,
        "median_reward": rewards[len(rewards) // 2] if rewards else math.nan,
    }
    return {"rewarded.jsonl": rewarded, "labelled.jsonl": labelled, "positives.jsonl": positives,
            "pairs.jsonl": pairs}, summary


def write_files(out: Path, files: dict[str, list[dict]], summary: dict) -> None:
    from llmrl.distributed.checkpoint import write_text_atomically

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_text_atomically(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
