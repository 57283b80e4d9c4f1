"""Built-in tasks with verifiable answers, generated deterministically: the data of the embedded default.

A task maps a short letter string to its answer ("abc>" -> "cba" for ``reverse``). Every possible string
is assigned to train or eval by a hash of its text, so held-out prompts are never trained on, whatever the
seed. Each task also names its typical mistake, which the warm start's imperfect teacher makes.
"""
from __future__ import annotations

import itertools
import random
import zlib
from dataclasses import dataclass
from typing import Callable

SEPARATOR = ">"


@dataclass(frozen=True)
class Task:
    name: str
    solve: Callable[[str], str]
    mistake: Callable[[str], str]  # what the imperfect teacher answers instead


TASKS = {
    "reverse": Task("reverse", lambda s: s[::-1], lambda s: s),
    "copy": Task("copy", lambda s: s, lambda s: s[::-1]),
    "sort": Task("sort", lambda s: "".join(sorted(s)), lambda s: s),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: built-in tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]


def is_held_out(text: str, eval_fraction: float) -> bool:
    return zlib.crc32(text.encode()) % 10_000 < eval_fraction * 10_000


def all_strings(alphabet: str, min_len: int, max_len: int) -> list[str]:
    if not alphabet or min_len < 1 or max_len < min_len:
        raise ValueError(f"task strings need a non-empty alphabet and 1 <= min_len <= max_len, got "
                         f"alphabet={alphabet!r}, min_len={min_len}, max_len={max_len}")
    return ["".join(p) for n in range(min_len, max_len + 1) for p in itertools.product(alphabet, repeat=n)]


def task_strings(alphabet: str, min_len: int, max_len: int, max_per_length: int) -> list[str]:
    """At most ``max_per_length`` strings of each length, the same ones on every machine and seed.

    Capping keeps lengths balanced: otherwise the longest strings outnumber the rest (6^5 vs 6^3).
    """
    strings = all_strings(alphabet, min_len, max_len)
    by_length: dict[int, list[str]] = {}
    for s in strings:
        by_length.setdefault(len(s), []).append(s)
    out = []
    for length in sorted(by_length):
        group = sorted(by_length[length], key=lambda s: zlib.crc32(("pick" + s).encode()))
        out.extend(sorted(group[:max_per_length]))
    return out


def task_rows(name: str, alphabet: str, min_len: int, max_len: int, eval_fraction: float, split: str,
              max_per_length: int = 1000) -> list[dict]:
    """The prompts of one split ("train" or "eval") as rows {prompt, answer}, in a fixed order."""
    task = get_task(name)
    rows = []
    for s in task_strings(alphabet, min_len, max_len, max_per_length):
        if is_held_out(s, eval_fraction) == (split == "eval"):
            rows.append({"prompt": s + SEPARATOR, "answer": task.solve(s)})
    return rows


def teacher_demonstrations(name: str, rows: list[dict], teacher_accuracy: float, rng: random.Random, n: int):
    """``n`` (prompt, completion) pairs from a teacher right with probability ``teacher_accuracy``."""
    task = get_task(name)
    out = []
    for _ in range(n):
        row = rows[rng.randrange(len(rows))]
        s = row["prompt"][: -len(SEPARATOR)]
        out.append((row["prompt"], task.solve(s) if rng.random() < teacher_accuracy else task.mistake(s)))
    return out
