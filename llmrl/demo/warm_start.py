"""Supervised warm start: a tiny GPT-2 built from scratch (or, for an environment, ``warm_start.base``, a pretrained
model) learns a task from an imperfect teacher, so that PPO starts from a model that often makes the teacher's
mistake.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmrl.config import Config, ConfigError
from llmrl.data.supervised import padded_segments
from llmrl.data.tasks import SEPARATOR, task_rows, teacher_demonstrations
from llmrl.demo.tiny import char_tokenizer, tiny_gpt2
from llmrl.distributed.checkpoint import write_atomically


def supervised_batch(tokenizer, pairs: list[tuple[str, str]]):
    """(input_ids, attention_mask, labels): prompt + completion + EOS, loss on the completion and EOS only."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return padded_segments(tokenizer, [[(encode(prompt), False), (encode(completion) + [tokenizer.eos_token_id], True)]
                                       for prompt, completion in pairs])


class GuessTeacher:
    """guess_number: binary search on the feedback (``expert``), else guesses drawn at random that ignore it (the
    mistake RL has to unlearn)."""

    def __init__(self, env, expert: bool, rng: random.Random):
        self.env, self.expert, self.rng = env, expert, rng
        self.low, self.high, self.guess = env.low, env.high, None

    def act(self, observation: str) -> str:
        if self.guess is not None:  # the feedback on the last guess: "+" or "Higher." means the secret is above it
            higher = observation.strip() in ("+", "Higher.")
            self.low, self.high = (self.guess + 1, self.high) if higher else (self.low, self.guess - 1)
        self.guess = (self.low + self.high) // 2 if self.expert else self.rng.randint(self.env.low, self.env.high)
        return str(self.guess)


class ToolTeacher:
    """calculator / python_tool: calls the tool and copies its result (``expert``), else answers at once with a
    mental estimate, the value to two significant figures (the mistake RL has to unlearn: it is seldom exact)."""

    def __init__(self, env, expert: bool, rng: random.Random):
        self.env, self.expert, self.called = env, expert, False

    def act(self, observation: str) -> str:
        if not self.expert:
            return f"answer: {int(float(f'{self.env.answer:.2g}'))}"
        if not self.called:
            self.called = True
            return self.env.tool_call(self.env.question)
        return f"answer: {observation.strip().removeprefix('= ')}"


TEACHERS = {"guess_number": GuessTeacher, "calculator": ToolTeacher, "python_tool": ToolTeacher}


def teacher_episodes(env, renderer, tokenizer, teacher, max_turns: int, teacher_accuracy: float,
                     rng: random.Random, n: int) -> list[list[tuple[list[int], bool]]]:
    """``n`` episodes played by ``teacher`` (an expert with chance ``teacher_accuracy``), as token segments
    (ids, trained) rendered as rollouts render them: the teacher's turns and their stop token are trained."""
    eos, episodes = tokenizer.eos_token_id, []
    for _ in range(n):
        obs, _ = env.reset(seed=rng.randrange(2**31))
        player = teacher(env, rng.random() < teacher_accuracy, rng)
        segments = [(renderer.first(obs), False)]
        for _ in range(max_turns):
            action = player.act(obs)
            segments.append((renderer.encode(action) + [eos], True))
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
            segments.append((renderer.reply(obs, model_ended=True), False))
        episodes.append(segments)
    return episodes


def run_env_warm_start(cfg: Config, progress: bool = True) -> Path:
    """A model warm-started on episodes of an imperfect teacher of ``env.name`` (see ``TEACHERS``), saved at
    ``cfg.model.name_or_path``: the tiny model (guess_number with symbols), or ``warm_start.base`` fine-tuned."""
    from llmrl.envs import make_env
    from llmrl.rollout.episodes import TurnRenderer

    ws = cfg.warm_start
    if ws.base is None and (cfg.env.name != "guess_number" or cfg.env.kwargs.get("style", "symbols") != "symbols"):
        raise ConfigError(f"warm_start builds a tiny model for env guess_number (style symbols) only, not "
                          f"env.name = {cfg.env.name!r} with {cfg.env.kwargs}: set warm_start.base to a pretrained "
                          f"model to fine-tune, remove warm_start or change the env")
    if cfg.env.name not in TEACHERS:
        raise ConfigError(f"warm_start has a teacher for env {', '.join(TEACHERS)} only, not env.name = "
                          f"{cfg.env.name!r}: remove warm_start, or warm-start a model of your own")
    env = make_env(cfg.env.name, cfg.env.kwargs)
    rng = random.Random(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    if ws.base is not None:
        model, tokenizer = pretrained_to_fine_tune(ws.base)
    else:
        chars = "".join(str(d) for d in range(env.low, env.high + 1)) + "?+-=!"
        tokenizer = char_tokenizer(chars)
        model = tiny_gpt2(tokenizer, ws.n_layer, ws.n_embd, ws.n_head, ws.n_positions, seed=cfg.run.seed)
        if 1 + cfg.env.max_episode_tokens + 1 > ws.n_positions:
            raise ConfigError(f"warm_start.n_positions = {ws.n_positions} is too short for episodes of "
                              f"env.max_episode_tokens = {cfg.env.max_episode_tokens}: raise it")
    renderer = TurnRenderer(tokenizer, cfg.env)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)

    def batch():
        ids, mask, labels = padded_segments(tokenizer, teacher_episodes(
            env, renderer, tokenizer, TEACHERS[cfg.env.name], cfg.env.max_turns, ws.teacher_accuracy, rng,
            ws.batch_size))
        if context is not None and ids.shape[1] > context:
            raise ConfigError(f"a teacher episode of env {cfg.env.name!r} is {ids.shape[1]} tokens, longer than the "
                              f"model's context of {context}: use a model with a longer context or shorter episodes")
        return ids, mask, labels
    return _train_and_save(cfg, model, tokenizer, batch, progress)


def pretrained_to_fine_tune(name: str):
    """(model in float32, tokenizer) of ``warm_start.base``, from a local folder or a package (``pkg:``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmrl.models.sources import resolve_model

    path = resolve_model(name, "warm_start.base")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"warm_start.base = {name!r} could not be loaded ({e}): point it at a model folder") from e
    if tokenizer.pad_token is None:  # padding is masked out of the loss: any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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
