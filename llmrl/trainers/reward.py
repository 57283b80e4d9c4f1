"""``python launch/train_reward.py --config configs/reward_minilm.yaml``: a Bradley-Terry reward model.

Loss: -log sigmoid(r(chosen) - r(rejected)) (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1). Pairs are
split by a hash of the prompt, so that no held-out prompt is trained on; pairwise accuracy on the held-out
pairs is reported before and after training. The saved folder is a plain sequence-classification model
(LoRA merged) plus ``llmrl_reward.json`` (how it reads text), ready for a training config's ``reward``.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmrl.config import ConfigError, RewardTrainConfig
from llmrl.data.chat import content, is_conversation
from llmrl.data.tasks import is_held_out
from llmrl.distributed.checkpoint import write_atomically
from llmrl.models.reward_model import META_FILE, format_texts, load_reward_tokenizer, load_text_fn
from llmrl.models.sources import resolve_model

COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(cfg: RewardTrainConfig) -> tuple[list[dict], list[dict]]:
    from llmrl.data.prompts import read_table

    rows = read_table(cfg.data, "data")
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ConfigError(f"data = {cfg.data!r} lacks column(s) {', '.join(missing)}: preference data needs "
                          f"prompt, chosen and rejected (columns: {', '.join(rows[0])})")
    train = [r for r in rows if not is_held_out(str(r["prompt"]), cfg.eval_fraction)]
    evals = [r for r in rows if is_held_out(str(r["prompt"]), cfg.eval_fraction)]
    if len(train) < cfg.batch_size or not evals:
        raise ConfigError(f"data = {cfg.data!r} gives {len(train)} training and {len(evals)} held-out pairs: "
                          f"need at least batch_size = {cfg.batch_size} and 1")
    return train, evals


def pair_scores(model, tokenizer, pairs: list[dict], cfg: RewardTrainConfig, text_fn, device):
    """(r(chosen), r(rejected)), each (B,), in one forward pass."""
    prompts = [p["prompt"] if is_conversation(p["prompt"]) else str(p["prompt"]) for p in pairs]
    texts = (format_texts(tokenizer, prompts, [content(p["chosen"]) for p in pairs], text_fn)
             + format_texts(tokenizer, prompts, [content(p["rejected"]) for p in pairs], text_fn))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt").to(device)
    rewards = model(**enc).logits[:, 0].float()
    return rewards[: len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs, cfg, text_fn, device, batch_size: int = 64) -> float:
    model.eval()
    right = 0
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = pair_scores(model, tokenizer, pairs[start:start + batch_size], cfg, text_fn, device)
        right += (chosen > rejected).sum().item()
    return right / len(pairs)


def train_reward_model(cfg: RewardTrainConfig) -> dict:
    from transformers import AutoModelForSequenceClassification

    from llmrl.models.policy import disable_dropout

    started = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    path = resolve_model(cfg.model, "model")
    text_fn = load_text_fn(cfg.text_fn)
    train, evals = load_pairs(cfg)
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output_dir = {str(out)!r} is not empty: choose another folder or remove it")

    torch.manual_seed(cfg.seed)
    tokenizer = load_reward_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                 lora_dropout=cfg.lora.dropout, task_type="SEQ_CLS",
                                                 target_modules=cfg.lora.target_modules or "all-linear"))
    model.to(device)
    accuracy_before = pairwise_accuracy(model, tokenizer, evals, cfg, text_fn, device)
    print(f"held-out pairwise accuracy before training: {accuracy_before:.4f} ({len(evals)} pairs)", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    rng = random.Random(cfg.seed)
    bar = tqdm(total=total, desc="reward model", disable=not cfg.progress, dynamic_ncols=True)
    step = 0
    while step < total:
        order = list(range(len(train)))
        rng.shuffle(order)
        for start in range(0, steps_per_epoch * cfg.batch_size, cfg.batch_size):
            if step >= total:
                break
            model.train()
            batch = [train[i] for i in order[start:start + cfg.batch_size]]
            chosen, rejected = pair_scores(model, tokenizer, batch, cfg, text_fn, device)
            loss = -F.logsigmoid(chosen - rejected).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(chosen > rejected).float().mean().item():.2f}",
                            refresh=False)
    bar.close()
    accuracy_after = pairwise_accuracy(model, tokenizer, evals, cfg, text_fn, device)
    if cfg.lora is not None:
        model = model.merge_and_unload()
    metrics = {"eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
               "train_pairs": len(train), "eval_pairs": len(evals), "steps": step,
               "wall_seconds": round(time.perf_counter() - started, 2)}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps({"text_fn": cfg.text_fn, "max_length": cfg.max_length,
                                                 "base": cfg.model}))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))

    write_atomically(out, write)
    print(json.dumps(metrics, indent=2))
    print(f"held-out pairwise accuracy {accuracy_before:.4f} -> {accuracy_after:.4f}; reward model saved to {out} "
          f"(use it as reward: {{components: [{{model: {out}"
          f"{', text_fn: ' + cfg.text_fn if cfg.text_fn else ''}}}]}})", flush=True)
    return metrics
