"""Supervised fine-tuning on the user's data (``algorithm: sft``, ``llmrl sft --config C.yaml``, ``llmrl.SFTTrainer``).

Rows in TRL's SFT formats: ``prompt`` + ``completion`` (texts, or conversational message lists) with the loss on
the completion only (TRL's ``completion_only_loss``), or ``messages`` (a conversation) with the loss on the
assistant turns only (TRL's ``assistant_only_loss``). A LoRA adapter is trained (``lora:``), or every weight
(``lora: null``). The run folder is a run's: ``log.jsonl`` (loss/sft, sft/token_accuracy, eval/loss,
eval/token_accuracy), ``summary.json`` and ``final/`` (``config.yaml``, ``tokenizer/`` and ``adapter/`` or ``model/``):
``final/adapter`` (start an RL run from it
with ``model.adapter``) or ``final/model`` (a plain transformers model: ``model.name_or_path``).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from llmrl.config import Config, ConfigError, SFTConfig, save_config, to_dict
from llmrl.data.chat import is_conversation, message_problem, render_prompt
from llmrl.data.supervised import padded_segments
from llmrl.models.memory import check_full_fine_tuning_fits

__all__ = ["SFTTrainer", "SFTResult", "run_sft"]

Segments = list[tuple[list[int], bool]]  # token segments of one row, each (ids, trained)


# ---------------------------------------------------------------------------------------------------------------
# rows -> token segments


def _text_of(tokenizer, value, where: str) -> str:
    """A completion's text: itself, or the content of its assistant message(s)."""
    if isinstance(value, str):
        return value
    problem = message_problem(value, text=False)
    if problem:
        raise ConfigError(f"{where} {problem}: a completion is text or a list of {{role, content}} messages")
    return "".join(m["content"] for m in value if m["role"] == "assistant")


def row_segments(tokenizer, row: dict, cfg: SFTConfig, where: str) -> Segments:
    """The token segments of one row: prompt (not trained), completion + EOS (trained); or, for a conversation,
    the chat template's text with the assistant turns trained (each turn's text as the template writes it, from
    after the generation prompt to the end of the turn) and EOS after a last assistant turn.

    A conversational prompt is rendered as rollouts render it (chat template, generation prompt) and its
    completion is the assistant's content + EOS, so that SFT trains what an RL run samples."""
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if cfg.messages_column in row and row[cfg.messages_column] is not None:
        messages = row[cfg.messages_column]
        problem = message_problem(messages, text=False) if not isinstance(messages, str) else \
            "is text, not a list of messages"
        if problem:
            raise ConfigError(f"{where}: {cfg.messages_column} {problem}: give a conversation (a list of "
                              f"{{role, content}} messages, TRL's format)")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not any(messages[i]["content"].strip() for i in turns):
            raise ConfigError(f"{where}: {cfg.messages_column} has no assistant turn with text: nothing to learn "
                              f"from (the loss is on the assistant turns only); fix or remove the row")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where} is a conversation but the tokenizer has no chat template: give prompt and "
                              f"completion texts, or use a model or model.tokenizer with a chat template")
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        segments, at = [], 0
        for i in turns:
            # the turn's text: from after its generation prompt (what a rollout is given) to the end of the turn
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            start, end = len(prefix), len(through)
            if not (at <= start <= end and full.startswith(prefix) and full.startswith(through)):
                raise ConfigError(f"{where}: the chat template does not write the conversation turn by turn "
                                  f"(assistant turn {i} does not follow its prefix): give prompt and completion "
                                  f"columns instead")
            segments += [(encode(full[at:start]), False), (encode(full[start:end]), True)]
            at = end
        segments.append((encode(full[at:]), False))
        if turns[-1] == len(messages) - 1 and segments[-2][0][-1:] != [eos]:
            segments.append(([eos], True))  # a rollout's turn ends with EOS: learn to stop there
        return [(ids, trained) for ids, trained in segments if ids]
    if cfg.prompt_column not in row or cfg.completion_column not in row:
        raise ConfigError(f"{where} has neither a {cfg.completion_column!r} column (with {cfg.prompt_column!r}) nor "
                          f"a {cfg.messages_column!r} column (columns: {', '.join(map(str, row))}): SFT needs "
                          f"completions to learn; set sft.completion_column / sft.messages_column")
    prompt, completion = row[cfg.prompt_column], row[cfg.completion_column]
    if prompt is None or (not isinstance(prompt, str) and message_problem(prompt, text=False)):
        raise ConfigError(f"{where}: {cfg.prompt_column} is {str(prompt)[:60]!r}: give text or a list of messages")
    text = _text_of(tokenizer, completion, f"{where}: {cfg.completion_column}") if completion is not None else ""
    if not text.strip():
        raise ConfigError(f"{where}: {cfg.completion_column} is empty: nothing to learn from (the loss is on the "
                          f"completion only); fix or remove the row")
    prompt_text = render_prompt(tokenizer, prompt, where) if is_conversation(prompt) else str(prompt)
    return [(encode(prompt_text), False), (encode(text) + [eos], True)]


def encode_rows(tokenizer, rows: list[dict], cfg: SFTConfig, key: str) -> tuple[list[Segments], int]:
    """(segments of each row cut to sft.max_length tokens, how many rows were cut). A row with no trained token
    left after the cut is an error naming it."""
    out, cut = [], 0
    for i, row in enumerate(rows):
        where = f"{key} row {i}"
        segments, kept, n = row_segments(tokenizer, row, cfg, where), [], 0
        for ids, trained in segments:
            take = ids[:max(0, cfg.max_length - n)]
            if take:
                kept.append((take, trained))
            n += len(take)
        cut += n < sum(len(ids) for ids, _ in segments)
        if not any(trained for _, trained in kept):
            raise ConfigError(f"{where}: its prompt fills all sft.max_length = {cfg.max_length} tokens, leaving none of the "
                              f"completion to learn from: raise sft.max_length or shorten the prompt")
        out.append(kept)
    return out, cut


# ---------------------------------------------------------------------------------------------------------------
# the loss


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy over the trained tokens, trained tokens, those the argmax predicts).

    logits: (B, L, V) at every position; labels: (B, L) token ids where trained, -100 elsewhere. Position t's
    logits predict token t + 1 (the shift every causal LM loss makes)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    n = int(mask.sum())
    loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum") / max(n, 1)
    correct = int((logits[mask].argmax(-1) == labels[mask]).sum())
    return loss, n, correct


def batches(episodes: list[Segments], size: int) -> Iterable[list[Segments]]:
    for start in range(0, len(episodes), size):
        yield episodes[start:start + size]


@torch.no_grad()
def evaluate_loss(model, tokenizer, episodes: list[Segments], batch_size: int, device) -> dict:
    """eval/loss (token-weighted over all held-out rows) and eval/token_accuracy."""
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    for chunk in batches(episodes, batch_size):
        ids, mask, labels = (t.to(device) for t in padded_segments(tokenizer, chunk))
        loss, n, c = sft_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        total, tokens, correct = total + loss.item() * n, tokens + n, correct + c
    return {"eval/loss": total / max(tokens, 1), "eval/token_accuracy": correct / max(tokens, 1)}


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class SFTResult:
    """What ``SFTTrainer.train()`` returns."""

    model: object  # the trained model (a peft model with LoRA, else the plain model), in eval mode
    tokenizer: object
    summary: dict  # what summary.json holds: eval loss before/after, steps, the folder to start an RL run from
    metrics: list[dict] = field(default_factory=list)  # log.jsonl's rows
    output: Path | None = None  # RUN/final/adapter (LoRA) or RUN/final/model (full fine-tuning)


def load_sft_rows(source: str, key: str) -> list[dict]:
    from llmrl.data.prompts import read_table
    from llmrl.user_functions import IN_MEMORY_PREFIX, in_memory

    if source.startswith(IN_MEMORY_PREFIX):
        rows = [dict(r) for r in in_memory(source, key, "train_dataset= or eval_dataset=")]
    else:
        rows = read_table(source, key)
    if not rows:
        raise ConfigError(f"{key} = {source!r} has no rows: it needs prompt/completion or messages rows")
    return rows


def split_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): sft.eval_data's first eval_size rows, or rows of sft.data chosen by a hash of
    their prompt (or conversation) over the whole file, as data.source is split (``llmrl.data.prompts.hold_out``):
    no completion of a held-out prompt is trained on, and a small file holds out a quarter, with a line."""
    from llmrl.data.prompts import hold_out

    s = cfg.sft
    train = load_sft_rows(s.data, "sft.data")
    if s.eval_data is not None:
        return train, load_sft_rows(s.eval_data, "sft.eval_data")[:s.eval_size]
    column = s.prompt_column if any(s.prompt_column in row for row in train) else s.messages_column
    return hold_out(train, s.eval_size, s.data, column, say=lambda line: print(line, flush=True),
                    keys=("sft.data", "sft.eval_data", "sft.eval_size"))


def build_sft_model(cfg: Config, tokenizer, device: torch.device):
    """The base, with a new LoRA adapter, the adapter of model.adapter, or all weights trained."""
    from llmrl.models import policy

    m = cfg.model
    if cfg.lora is None:
        check_full_fine_tuning_fits(m, device)
    base = policy.load_base_model(m, tokenizer, device)
    fingerprint = base.llmrl_base_fingerprint
    if cfg.lora is None:
        model = base
        model.requires_grad_(True)
    else:
        model = policy.load_adapter(base, m) if m.adapter else policy.add_lora(base, cfg.lora)
    model.llmrl_base_fingerprint = fingerprint
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def write_sft_model(model, tokenizer, cfg: Config, folder: Path) -> None:
    """adapter/ (peft, with the base's fingerprint) or model/ (plain), tokenizer/ and config.yaml, into ``folder``."""
    from llmrl.models.policy import ADAPTER_FINGERPRINT

    if cfg.lora is None:
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    else:
        model.save_pretrained(folder / "adapter")
        (folder / "adapter" / ADAPTER_FINGERPRINT).write_text(json.dumps(model.llmrl_base_fingerprint))
    tokenizer.save_pretrained(folder / "tokenizer")
    save_config(cfg, folder / "config.yaml")


def save_sft_model(model, tokenizer, cfg: Config, target: Path) -> Path:
    """RUN/final: adapter/ (peft, with the base's fingerprint) or model/ (plain), tokenizer/, config.yaml. Returns
    the folder an RL run starts from."""
    from llmrl.distributed.checkpoint import write_atomically

    write_atomically(target, lambda tmp: write_sft_model(model, tokenizer, cfg, tmp))
    return target / ("model" if cfg.lora is None else "adapter")


def save_sft_checkpoint(model, tokenizer, cfg: Config, target: Path, optimizer, scheduler, strategy,
                        state: dict) -> None:
    """RUN/step-N (run.save_every): the weights as final/ holds them, the RNG state and, written last (its presence
    marks a complete checkpoint), trainer_state.pt: the step, the eval figures before training, the seconds so far
    and the optimizer's and the schedule's state. Renamed into place whole, so a kill leaves only complete ones;
    older ones beyond run.keep_last are removed."""
    from llmrl.distributed.checkpoint import COMPLETE_MARK, prune_checkpoints, write_atomically

    def write(tmp: Path) -> None:
        write_sft_model(model, tokenizer, cfg, tmp)
        torch.save(strategy.rng_state(), tmp / "rng_rank0.pt")
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / COMPLETE_MARK)

    write_atomically(target, write)
    prune_checkpoints(target.parent, cfg.run.keep_last)


# what a resumed SFT run must share with the run it continues (the rest, e.g. sft.max_steps or sft.lr, may change)
SFT_FIXED = ("model.name_or_path", "model.adapter", "model.dtype", "model.quantization", "lora", "sft.data",
             "sft.eval_data", "sft.eval_size", "sft.prompt_column", "sft.completion_column", "sft.messages_column",
             "sft.max_length", "sft.batch_size", "run.seed")


def load_sft_checkpoint(checkpoint: Path, cfg: Config, model, optimizer, scheduler, strategy) -> dict:
    """Continue from ``checkpoint`` (a step-N folder): refuses a config that changed what the run is (SFT_FIXED),
    loads the weights, the optimizer's and the schedule's state and the RNG state; returns trainer_state.pt."""
    import yaml

    from llmrl.config import from_dict, upgrade_saved_config
    from llmrl.distributed.checkpoint import COMPLETE_MARK, load_state_file
    from llmrl.trainers.base import read_weights

    saved = to_dict(from_dict(Config, upgrade_saved_config(yaml.safe_load((checkpoint / "config.yaml").read_text()))))
    given = to_dict(cfg)
    for key in SFT_FIXED:
        old, new = saved, given
        for part in key.split("."):
            old, new = (old or {}).get(part), (new or {}).get(part)
        if old != new:
            raise ConfigError(f"--resume: {key} is {new!r} but the run in {checkpoint.parent} was started with "
                              f"{old!r}: a resumed SFT run keeps it; set it back, or start a new run (another "
                              f"run.output_dir)")
    state = load_state_file(checkpoint / COMPLETE_MARK)
    device = next(model.parameters()).device
    if cfg.lora is None:
        weights = read_weights(checkpoint / "model" / "model.safetensors", device)
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise ConfigError(f"checkpoint {checkpoint}: model/ holds weights this model has not ({unexpected[0]}): "
                              f"it is another model's; move the folder away to resume from the one before it")
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, read_weights(checkpoint / "adapter" / "adapter_model.safetensors", device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    strategy.set_rng_state(load_state_file(checkpoint / "rng_rank0.pt"))
    return state


def run_sft(cfg: Config, overwrite: bool = False, resume: bool = False) -> SFTResult:
    """Supervised fine-tuning as ``cfg`` says (``algorithm: sft``); see the module docstring. ``resume``: continue
    from the newest step-N checkpoint (``run.save_every``), with the same data order from there on."""
    from tqdm.auto import tqdm

    from llmrl.distributed.checkpoint import step_dir_name
    from llmrl.distributed.run_dir import claim_run_dir, make_run_dir
    from llmrl.distributed.strategy import SingleProcess
    from llmrl.models.policy import load_tokenizer
    from llmrl.tracking import MetricsLogger, read_log

    from llmrl.distributed.strategy import launched_by_deepspeed
    from llmrl.trainers.base import lr_lambda

    if launched_by_deepspeed():
        raise ConfigError("llmrl sft runs in one process (one GPU or the CPU): start it with python or llmrl sft, "
                          "not the deepspeed launcher")
    if cfg.algorithm != "sft":
        raise ConfigError(f"algorithm is {cfg.algorithm!r}: llmrl sft with a data file runs algorithm: sft (set "
                          f"it, with an sft section), or give the config a warm_start section")
    started = time.perf_counter()
    s = cfg.sft
    train_rows, eval_rows = split_rows(cfg)  # a missing file or column fails before any model is loaded
    strategy = SingleProcess(cfg.run.device, cfg.run.threads)
    run_dir = Path(cfg.run.output_dir)
    checkpoint, lock = claim_run_dir(run_dir, resume, overwrite, strategy)
    try:
        strategy.seed_everything(cfg.run.seed)
        tokenizer = load_tokenizer(cfg.model)
        # every row is checked (and tokenised) before the model is loaded
        train, cut = encode_rows(tokenizer, train_rows, s, "sft.data")
        evals, _ = encode_rows(tokenizer, eval_rows, s, "sft.eval_data" if s.eval_data else "sft.data (held out)")
        model = build_sft_model(cfg, tokenizer, strategy.device)
        make_run_dir(run_dir, overwrite)
        device = strategy.device
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=cfg.train.weight_decay)
        per_epoch = math.ceil(len(train) / s.batch_size)
        total = per_epoch * s.epochs if s.max_steps is None else s.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, total))
        start_step, seconds_before = 0, 0.0
        if checkpoint is not None:
            state = load_sft_checkpoint(checkpoint, cfg, model, optimizer, scheduler, strategy)
            start_step, before, seconds_before = state["step"], state["eval_before"], state["wall_seconds"]
        r = cfg.run
        logger = MetricsLogger(run_dir, resume_step=start_step if checkpoint is not None else None,
                               report_to=r.report_to, config=to_dict(cfg), wandb_project=r.wandb_project,
                               wandb_entity=r.wandb_entity, wandb_run_name=r.wandb_run_name)
        if checkpoint is None:
            before = evaluate_loss(model, tokenizer, evals, s.batch_size, device)
            logger.log(0, before)
            print(f"sft: {len(train)} training rows ({cut} cut to sft.max_length = {s.max_length}), {len(evals)} "
                  f"held out; eval loss before training {before['eval/loss']:.4f}", flush=True)
        else:
            print(f"sft: resumed from {checkpoint} (step {start_step} of {total})", flush=True)
        rng = random.Random(cfg.run.seed)
        bar = tqdm(total=total, initial=start_step, desc="sft", disable=not cfg.run.progress, dynamic_ncols=True)
        step, after = 0, before
        while step < total:  # a resumed run replays the same shuffles and skips the batches already trained on
            order = list(range(len(train)))
            rng.shuffle(order)
            for chunk in batches([train[i] for i in order], s.batch_size):
                if step >= total:
                    break
                if step < start_step:
                    step += 1
                    continue
                model.train()
                ids, mask, labels = (t.to(device) for t in padded_segments(tokenizer, chunk))
                loss, n, correct = sft_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or math.inf))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if not math.isfinite(loss.item()):
                    raise ConfigError(f"step {step}: the SFT loss is {loss.item()}: lower sft.lr")
                stats = {"loss/sft": loss.item(), "sft/token_accuracy": correct / max(n, 1), "sft/tokens": n,
                         "optim/grad_norm": grad_norm, "optim/lr": lr}
                if step == total or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
                    after = evaluate_loss(model, tokenizer, evals, s.batch_size, device)
                    stats.update(after)
                logger.log(step, stats)
                if cfg.run.save_every and step % cfg.run.save_every == 0 and step < total:
                    save_sft_checkpoint(model, tokenizer, cfg, run_dir / step_dir_name(step), optimizer, scheduler,
                                        strategy, {"step": step, "eval_before": before, "wall_seconds":
                                                   seconds_before + time.perf_counter() - started})
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        if after is before:  # resumed at the last step: nothing trained here, nothing evaluated yet
            after = evaluate_loss(model, tokenizer, evals, s.batch_size, device)
            logger.log(step, after)
        logger.close()
        model.eval()
        output = save_sft_model(model, tokenizer, cfg, run_dir / "final")
        if cfg.lora is None:
            start = f"model.name_or_path: {output}"
        else:
            start = f"model.name_or_path: {cfg.model.name_or_path} and model.adapter: {output}"
        summary = {"eval_loss_before": before["eval/loss"], "eval_loss_after": after["eval/loss"],
                   "eval_token_accuracy_before": before["eval/token_accuracy"],
                   "eval_token_accuracy_after": after["eval/token_accuracy"], "steps": step,
                   "train_rows": len(train), "eval_rows": len(evals), "truncated_rows": cut,
                   "full_fine_tuning": cfg.lora is None, "output": str(output), "rl_start": start,
                   "run_dir": str(run_dir), "wall_seconds": round(seconds_before + time.perf_counter() - started, 2)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"done: {step} steps, eval loss {before['eval/loss']:.4f} -> {after['eval/loss']:.4f}; saved {output}. "
              f"Start an RL run from it with {start}", flush=True)
        return SFTResult(model=model, tokenizer=tokenizer, summary=summary, metrics=read_log(run_dir), output=output)
    finally:
        if lock is not None:
            lock.release()


class SFTTrainer:
    """Supervised fine-tuning from Python, as ``llmrl sft`` runs it (TRL's ``SFTTrainer`` in llmrl's terms).

    ``config``: a ``Config``, a dict or a YAML path (``algorithm`` is set to sft); ``overrides``: ``section.key=value``
    strings. ``model``: a name or folder (replaces model.name_or_path); ``train_dataset`` / ``eval_dataset``: a
    ``datasets.Dataset`` or a list of dicts in TRL's SFT formats (replace sft.data / sft.eval_data).
    ``train()`` returns an ``SFTResult``; its ``summary["rl_start"]`` says how an RL config starts from it.
    ``resume=True`` continues from the newest step-N checkpoint (``run.save_every``)."""

    def __init__(self, config: Config | dict | str | Path | None = None, *, overrides: Iterable[str] = (),
                 model: str | Path | None = None, train_dataset=None, eval_dataset=None, overwrite: bool = False,
                 resume: bool = False):
        from llmrl.config import _read_yaml, apply_override, from_dict

        if isinstance(config, (str, Path)):
            data = _read_yaml(config)
        elif config is None or isinstance(config, (Config, dict)):
            data = to_dict(config) if isinstance(config, Config) else json.loads(json.dumps(config or {}, default=str))
        else:
            raise ConfigError(f"config is a {type(config).__name__}: give a llmrl Config, a dict or a YAML path")
        for assignment in overrides:
            apply_override(data, assignment)
        data["algorithm"] = "sft"
        for section in ("model", "sft"):
            data[section] = dict(data.get(section) or {})
        if model is not None:
            if not isinstance(model, (str, Path)):
                raise ConfigError(f"model is a {type(model).__name__}: give SFTTrainer a model name or folder (save "
                                  f"a model object with save_pretrained first)")
            data["model"]["name_or_path"] = str(model)
        for key, rows in (("data", train_dataset), ("eval_data", eval_dataset)):
            if rows is not None:
                data["sft"][key] = _register_rows(rows, "train_dataset" if key == "data" else "eval_dataset")
        self.cfg = from_dict(Config, data)
        self.cfg.validate()
        self.overwrite, self.resume = overwrite, resume

    def train(self) -> SFTResult:
        return run_sft(self.cfg, self.overwrite, self.resume)


def _register_rows(rows, what: str) -> str:
    from llmrl.user_functions import register_in_memory

    if hasattr(rows, "to_list") and hasattr(rows, "column_names"):  # a datasets.Dataset
        rows = rows.to_list()
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{what} is a {type(rows).__name__}: give a datasets.Dataset or a list of dicts (one per "
                          f"row: prompt and completion, or messages)")
    rows = [dict(r) for r in rows]
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return register_in_memory(f"sft-{what}-{len(rows)}rows-{digest}", rows)
