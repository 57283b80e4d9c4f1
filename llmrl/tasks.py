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


def preference_pairs(name: str, rows: list[dict], seed: int = 0) -> list[dict]:
    """One {prompt, chosen, rejected} pair per row: the right answer against a wrong one.

    Wrong answers mix the task's typical mistake (half), a shuffle of the right letters, and a wrong length,
    so that a reward model must look at the letters' order, not only at length or identity.
    """
    task = get_task(name)
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        s = row["prompt"][: -len(SEPARATOR)]
        right = task.solve(s)
        kind = rng.random()
        if kind < 0.5 and task.mistake(s) != right:
            wrong = task.mistake(s)
        elif kind < 0.75 and len(set(right)) > 1:
            wrong = right
            while wrong == right:
                wrong = "".join(rng.sample(right, len(right)))
        else:
            wrong = right[:-1] if rng.random() < 0.5 else right + rng.choice(right)
        pairs.append({"prompt": row["prompt"], "chosen": right, "rejected": wrong})
    return pairs


def write_preference_file(path: str, name: str = "reverse", alphabet: str = "abcdef", min_len: int = 3,
                          max_len: int = 5, max_per_length: int = 1000, eval_fraction: float = 0.1) -> None:
    """The shipped configs/data/reverse_prefs.jsonl: pairs over the task's train split only, so that the
    PPO recipe's held-out prompts stay unseen by the reward model too."""
    import json

    rows = task_rows(name, alphabet, min_len, max_len, eval_fraction, "train", max_per_length)
    with open(path, "w") as f:
        for pair in preference_pairs(name, rows):
            f.write(json.dumps(pair) + "\n")


if __name__ == "__main__":  # python -m llmrl.tasks configs/data/reverse_prefs.jsonl
    import sys

    write_preference_file(sys.argv[1])
