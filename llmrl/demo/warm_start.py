"""Supervised warm start of the embedded default: a tiny GPT-2 built from scratch learns a task from an
imperfect teacher, so that PPO starts from a model that often makes the teacher's mistake.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmrl.config import Config, ConfigError
from llmrl.data.tasks import SEPARATOR, task_rows, teacher_demonstrations
from llmrl.demo.tiny import char_tokenizer, tiny_gpt2
from llmrl.distributed.checkpoint import write_atomically


def supervised_batch(tokenizer, pairs: list[tuple[str, str]]):
    """(input_ids, attention_mask, labels): prompt + completion + EOS, loss on the completion and EOS only."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return padded_segments(tokenizer, [[(encode(prompt), False), (encode(completion) + [tokenizer.eos_token_id], True)]
                                       for prompt, completion in pairs])


def padded_segments(tokenizer, episodes: list[list[tuple[list[int], bool]]]):
    """(input_ids, attention_mask, labels) of token segments, each (ids, trained): the loss is on trained ones."""
    L = max(sum(len(ids) for ids, _ in ep) for ep in episodes)
    ids = torch.full((len(episodes), L), tokenizer.pad_token_id)
    mask = torch.zeros((len(episodes), L), dtype=torch.long)
    labels = torch.full((len(episodes), L), -100)
    for row, ep in enumerate(episodes):
        at = 0
        for segment, trained in ep:
            ids[row, at:at + len(segment)] = torch.tensor(segment)
            if trained:
                labels[row, at:at + len(segment)] = torch.tensor(segment)
            at += len(segment)
        mask[row, :at] = 1
    return ids, mask, labels


def guess_number_demonstrations(env, tokenizer, max_turns: int, teacher_accuracy: float, rng: random.Random,
                                n: int) -> list[list[tuple[list[int], bool]]]:
    """Episodes of guess_number (symbols) played by a teacher: binary search with chance ``teacher_accuracy``,
    else guesses drawn at random that ignore the feedback (the mistake RL has to unlearn)."""
    eos, episodes = tokenizer.eos_token_id, []
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for _ in range(n):
        obs, _ = env.reset(seed=rng.randrange(2**31))
        segments, low, high = [(encode(obs), False)], env.low, env.high
        searches = rng.random() < teacher_accuracy
        for _ in range(max_turns):
            guess = (low + high) // 2 if searches else rng.randint(env.low, env.high)
            segments.append((encode(str(guess)) + [eos], True))
            obs, _, terminated, _, _ = env.step(str(guess))
            if terminated:
                break
            low, high = (guess + 1, high) if obs == "+" else (low, guess - 1)
            segments.append((encode(obs), False))
        episodes.append(segments)
    return episodes


def run_env_warm_start(cfg: Config, progress: bool = True) -> Path:
    """The tiny model warm-started on guess_number episodes of an imperfect teacher (see
    ``guess_number_demonstrations``), saved at ``cfg.model.name_or_path``."""
    from llmrl.envs import make_env

    ws = cfg.warm_start
    if cfg.env.name != "guess_number" or cfg.env.kwargs.get("style", "symbols") != "symbols":
        raise ConfigError(f"warm_start builds a tiny model for env guess_number (style symbols) only, not "
                          f"env.name = {cfg.env.name!r} with {cfg.env.kwargs}: remove warm_start or change the env")
    env = make_env(cfg.env.name, cfg.env.kwargs)
    chars = "".join(str(d) for d in range(env.low, env.high + 1)) + "?+-=!"
    tokenizer = char_tokenizer(chars)
    model = tiny_gpt2(tokenizer, ws.n_layer, ws.n_embd, ws.n_head, ws.n_positions, seed=cfg.run.seed)
    if 1 + cfg.env.max_episode_tokens + 1 > ws.n_positions:
        raise ConfigError(f"warm_start.n_positions = {ws.n_positions} is too short for episodes of "
                          f"env.max_episode_tokens = {cfg.env.max_episode_tokens}: raise it")
    rng = random.Random(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)

    def batch():
        return padded_segments(tokenizer, guess_number_demonstrations(env, tokenizer, cfg.env.max_turns,
                                                                      ws.teacher_accuracy, rng, ws.batch_size))
    return _train_and_save(cfg, model, tokenizer, batch, progress)


def _train_and_save(cfg: Config, model, tokenizer, batch, progress: bool) -> Path:
    ws = cfg.warm_start
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(ws.steps), desc="warm start (SFT)", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        ids, mask, labels = batch()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    target = Path(cfg.model.name_or_path)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_atomically(target, write)
    print(f"warm start: {ws.steps} supervised steps in {time.perf_counter() - start:.1f}s -> {target}", flush=True)
    return target


def run_warm_start(cfg: Config, progress: bool = True) -> Path:
    """Train the tiny model of ``cfg.warm_start`` and save it (atomically) at ``cfg.model.name_or_path``."""
    ws = cfg.warm_start
    if ws is None:
        raise ConfigError("this config has no warm_start section: add one, or point model.name_or_path at a model")
    if cfg.env.name:
        return run_env_warm_start(cfg, progress)
    if not cfg.data.source.startswith("task:"):
        raise ConfigError(f"warm_start trains on a built-in task, but data.source = {cfg.data.source!r}: "
                          f"use task:NAME or remove warm_start")
    task_name, t = cfg.data.source[len("task:"):], cfg.data.task
    rows = task_rows(task_name, t.alphabet, t.min_len, t.max_len, t.eval_fraction, "train",
                      t.max_per_length)
    tokenizer = char_tokenizer(t.alphabet + SEPARATOR)
    model = tiny_gpt2(tokenizer, ws.n_layer, ws.n_embd, ws.n_head, ws.n_positions, seed=cfg.run.seed)
    if t.max_len + 1 + cfg.generation.max_new_tokens > ws.n_positions:
        raise ConfigError(f"warm_start.n_positions = {ws.n_positions} is too short for prompts of "
                          f"{t.max_len + 1} tokens plus generation.max_new_tokens = {cfg.generation.max_new_tokens}")
    rng = random.Random(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)

    def batch():
        return supervised_batch(tokenizer, teacher_demonstrations(task_name, rows, ws.teacher_accuracy, rng,
                                                                  ws.batch_size))
    return _train_and_save(cfg, model, tokenizer, batch, progress)
