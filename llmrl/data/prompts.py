"""Prompt datasets: a built-in task, a local file (.jsonl/.json/.csv/.parquet) or a `datasets` name.

Rows are plain dicts; the prompt column is required and every other column reaches the reward as a
keyword argument (e.g. a reference answer).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from llmrl.config import ConfigError, DataConfig, EnvConfig
from llmrl.data.chat import message_problem, render_prompt, text_problem
from llmrl.data.tasks import task_rows
from llmrl.user_functions import IN_MEMORY_PREFIX, in_memory

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# More characters per token than any tokenizer averages over a whole prompt: a prompt longer than this many
# characters per token of its limit is refused before it is tokenised (which, for megabytes, takes minutes).
PROMPT_CHARS_PER_TOKEN = 16


def _load_rows(source: str, cfg: DataConfig, split: str, key: str) -> list[dict]:
    if source.startswith("task:"):
        t = cfg.task
        try:
            return task_rows(source[len("task:"):], t.alphabet, t.min_len, t.max_len, t.eval_fraction, split,
                             t.max_per_length)
        except ValueError as e:
            raise ConfigError(f"{key} = {source!r}: {e}") from e
    if source.startswith(IN_MEMORY_PREFIX):  # rows a Python program passed (train_dataset=, eval_dataset=)
        return [dict(row) for row in in_memory(source, key, "train_dataset= or eval_dataset=")]
    return read_table(source, key)


def read_table(source: str, key: str) -> list[dict]:
    """Rows of a .jsonl/.json/.csv/.parquet file or of a `datasets` name (its train split)."""
    import datasets

    path = Path(source)
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise ConfigError(f"{key} = {source!r} does not exist: give a prompt file path or task:NAME")
        data = path.read_bytes()
        if not data.strip():
            raise ConfigError(f"{key} = {source!r} is an empty file: it needs at least one prompt")
        if path.suffix != ".parquet":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data[:e.start].count(b"\n") + 1
                raise ConfigError(f"{key} = {source!r} is not UTF-8 text (byte {data[e.start]:#04x} on line {line}): "
                                  f"save it as UTF-8") from None
        try:
            ds = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # a malformed file: say which one
            raise ConfigError(f"{key} = {source!r} could not be read as {path.suffix}: {e}") from e
    else:
        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as e:  # datasets raises many types for a missing name
            raise ConfigError(f"{key} = {source!r} is neither a task:NAME, a prompt file "
                              f"({', '.join(FILE_FORMATS)}) nor a loadable dataset: {e}") from e
    return [dict(row) for row in ds]


def episode_rows(cfg: DataConfig, env: EnvConfig,
                 say: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """The rows of episodes against ``env.name``: seeds alone when there is no data.source (training seeds
    0 .. train_seeds - 1, held-out ones from eval_seed_offset on); else the data's rows, each given to the
    environment's ``reset`` as ``options`` (with a ``seed`` column, or its row number as the seed)."""
    if not cfg.source:
        if env.eval_seed_offset < env.train_seeds:
            raise ConfigError(f"env.eval_seed_offset = {env.eval_seed_offset} is below env.train_seeds = "
                              f"{env.train_seeds}: held-out episodes would replay training seeds; raise it")
        return ([{"seed": s} for s in range(env.train_seeds)],
                [{"seed": env.eval_seed_offset + i} for i in range(cfg.eval_size)])
    train = read_table(cfg.source, "data.source")
    if cfg.eval_source is not None:
        evals = read_table(cfg.eval_source, "data.eval_source")
    else:
        train, evals = hold_out(train, cfg.eval_size, cfg.source, cfg.prompt_column, say)
    for rows, offset in ((train, 0), (evals, env.eval_seed_offset)):
        for i, row in enumerate(rows):
            row.setdefault("seed", offset + i)
    return train, evals[:cfg.eval_size]


def load_prompts(cfg: DataConfig, env: EnvConfig | None = None,
                 say: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows), each a list of dicts holding at least ``cfg.prompt_column`` (with ``env``
    naming an environment: the episodes' rows, see ``episode_rows``). No eval rows with ``cfg.eval_size`` 0.
    ``say`` gets the one line about a held-out split smaller than ``eval_size`` (see ``hold_out``)."""
    if env is not None and env.name:
        return episode_rows(cfg, env, say)
    train = _checked_rows(cfg.source, cfg, "train", "data.source")
    if cfg.eval_source is not None:
        evals = _checked_rows(cfg.eval_source, cfg, "eval", "data.eval_source")
    elif cfg.source.startswith("task:"):
        evals = _checked_rows(cfg.source, cfg, "eval", "data.source")
    else:  # hold out rows chosen by a hash of their prompt, from the whole file
        train, evals = hold_out(train, cfg.eval_size, cfg.source, cfg.prompt_column, say)
    if len(evals) > cfg.eval_size:  # a fixed random subset, not the first rows of a sorted file
        pick = random.Random(0).sample(range(len(evals)), cfg.eval_size)
        evals = [evals[i] for i in sorted(pick)]
    return train, evals


def prompt_hash(prompt) -> bytes:
    """A digest of a prompt (text or messages) that is the same in every process, run and Python version."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def hold_out(rows: list[dict], eval_size: int, source: str, column: str,
             say: Callable[[str], None] | None = None,
             keys: tuple[str, str, str] = ("data.source", "data.eval_source", "data.eval_size")
             ) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of one source that has no data.eval_source: the held-out prompts are those
    whose hash (``prompt_hash``) is smallest, so they are spread over the whole file whatever its order, the
    same on every rank and in every run; no copy of a held-out prompt is trained on. Both keep the file's
    order. ``eval_size`` 0: nothing is held out. More than a quarter of the rows is never taken: a small file
    holds out a quarter (at least one row) and ``say`` is told so; a single row is refused (nothing would be
    left to train on). ``keys``: the config keys of the source, its eval source and the eval size, for messages
    (SFT's are sft.data, sft.eval_data, sft.eval_size)."""
    source_key, eval_source_key, size_key = keys
    fix = (f"add rows, set {eval_source_key}, or set {size_key}: 0 to skip evaluation" if size_key == "data.eval_size"
           else f"add rows or set {eval_source_key}")
    if eval_size == 0:
        return rows, []
    n = len(rows)
    nothing_left = (f"{source_key} = {source!r} has {n} row{'s' if n != 1 else ''}: holding {{}} out for "
                    f"evaluation leaves nothing to train on; {fix}")
    if n < 2:
        raise ConfigError(nothing_left.format("one"))
    size = min(eval_size, max(1, n // 4))
    if size < eval_size and say is not None:
        say(f"{source_key} has {n} rows: holding out {size} for evaluation ({size_key} {eval_size} is more "
            f"than a quarter)")
    keys = [prompt_hash(row[column] if column in row else row) for row in rows]
    order = sorted(range(n), key=lambda i: (keys[i], i))  # smallest hash first; equal prompts side by side
    held = set(order[:size])
    # the other copies of the last held-out prompt are not trained on either (dropped: they would leak)
    last = keys[order[size - 1]]
    dropped = {i for i in order[size:] if keys[i] == last}
    train = [row for i, row in enumerate(rows) if i not in held and i not in dropped]
    if not train:  # every row is the same prompt
        raise ConfigError(nothing_left.format(f"{size} (every row has the same prompt)"))
    return train, [rows[i] for i in sorted(held)]


def _checked_rows(source: str, cfg: DataConfig, split: str, key: str) -> list[dict]:
    """The rows of one source, every prompt checked before any split, so that an error names the row of the file."""
    rows = _load_rows(source, cfg, split, key)
    column = cfg.prompt_column
    if not rows:
        which = f" ({split} split)" if source.startswith("task:") else ""
        raise ConfigError(f"{key} = {source!r}{which} gave an empty dataset: it needs at least one prompt")
    if column not in rows[0]:
        raise ConfigError(f"{key} has no column {column!r} (columns: {', '.join(rows[0])}): set data.prompt_column")
    for i, row in enumerate(rows):
        problem = message_problem(row[column], text=False)
        if problem:
            raise ConfigError(f"{key}: prompt {i} {problem}: the {column!r} column must hold text or conversations "
                              f"(lists of {{role, content}} messages, TRL's format)")
        problem = text_problem(row[column])
        if problem:  # empty, only whitespace or a NUL: it would be trained on without a word
            raise ConfigError(f"{key}: prompt {i} {problem} (row {i} of {source!r}, counting from 0)")
    return rows


def check_prompt_lengths(rows: list[dict], column: str, tokenizer, max_prompt_length: int,
                         max_new_tokens: int, context: int | None, where: str = "data.source") -> None:
    """Fail before training when a prompt (rendered with the chat template if it is a conversation) is too long
    for data.max_prompt_length or the model's context."""
    limit = max_prompt_length
    if context is not None:
        if max_new_tokens >= context:
            raise ConfigError(f"generation.max_new_tokens = {max_new_tokens} leaves no room for a prompt in the "
                              f"model's context of {context} tokens: lower it below {context}")
        limit = min(limit, context - max_new_tokens)
    for i, row in enumerate(rows):
        text = render_prompt(tokenizer, row[column], f"{where}: prompt {i}")
        if len(text) > PROMPT_CHARS_PER_TOKEN * limit:  # tokenising megabytes would hang before the count below
            raise ConfigError(f"{where}: prompt {i} has {len(text):,} characters, far more than {limit} tokens can "
                              f"hold (at most {PROMPT_CHARS_PER_TOKEN} characters per token): shorten or remove the "
                              f"row. Prompt: {text[:80]!r}")
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            why = (f"data.max_prompt_length = {max_prompt_length}" if limit == max_prompt_length else
                   f"the model's context {context} minus generation.max_new_tokens = {max_new_tokens}")
            raise ConfigError(f"{where}: prompt {i} has {n} tokens, more than {limit} ({why}): shorten it, raise the "
                              f"limit or lower max_new_tokens. Prompt: {text[:80]!r}")
