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


def labelled_answers(pairs: list[dict], seed: int = 0) -> list[dict]:
    """KTO's unpaired form of preference pairs, as a deployed model's log would hold them: one answer per prompt,
    the chosen one labelled true or the rejected one labelled false, a coin flip (seeded) deciding which."""
    rng = random.Random(seed)
    rows = []
    for pair in pairs:
        good = rng.random() < 0.5
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    return rows


def write_labelled_file(path: str) -> None:
    """The shipped configs/data/reverse_labels.jsonl: reverse_prefs.jsonl's pairs, one labelled answer each."""
    rows = task_rows("reverse", "abcdef", 3, 5, 0.1, "train", 1000)
    write_jsonl(path, labelled_answers(preference_pairs("reverse", rows)))


# ----------------------------------------------------------------------------------------------
# Arithmetic for a pretrained chat model (configs/smollm2.yaml): conversations in TRL's format


ARITHMETIC_TEMPLATES = ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?",
                        "What is {a} {word} {b}?")
ARITHMETIC_OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b),
                  "*": ("times", lambda a, b: a * b)}


def arithmetic_problems() -> list[tuple[int, str, int]]:
    """(a, op, b): sums of 1..12 and 1..12, differences a - b with 1 <= b <= a <= 15, products of 2..9."""
    problems = [(a, "+", b) for a in range(1, 13) for b in range(1, 13)]
    problems += [(a, "-", b) for a in range(1, 16) for b in range(1, a + 1)]
    problems += [(a, "*", b) for a in range(2, 10) for b in range(2, 10)]
    return problems


def arithmetic_rows(split: str, eval_fraction: float = 0.35) -> list[dict]:
    """Rows {prompt: [one user message], answer, solution} of one split. Problems, not phrasings, are held out
    (by hash): no held-out problem is trained on in any wording. Train: every phrasing of every train problem;
    eval: each held-out problem once, in a phrasing chosen by hash."""
    rows = []
    for a, op, b in arithmetic_problems():
        key = f"{a}{op}{b}"
        if is_held_out(key, eval_fraction) != (split == "eval"):
            continue
        word, solve = ARITHMETIC_OPS[op]
        templates = ARITHMETIC_TEMPLATES if split == "train" else \
            [ARITHMETIC_TEMPLATES[zlib.crc32(key.encode()) % len(ARITHMETIC_TEMPLATES)]]
        for template in templates:
            question = template.format(a=a, b=b, op=op, word=word)
            answer = solve(a, b)
            rows.append({"prompt": [{"role": "user", "content": question}], "answer": answer,
                         "solution": str(answer)})
    return rows


def arithmetic_preference_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """One {prompt, chosen, rejected} pair per row, in TRL's conversational form: a short right answer against a
    wrong one (a wrong result in the same words, or the right one buried in a long answer that never ends)."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        question = row["prompt"][0]["content"]
        right = row["answer"]
        expression = question.removeprefix("What is ").removeprefix("Calculate ").rstrip("?.= ").strip()
        wrong = right + rng.choice([-3, -2, -1, 1, 2, 10])
        rejected = f"{expression} = {wrong}" if rng.random() < 0.7 else \
            f"To solve {expression}, we need to think about what the numbers mean. First"
        pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": f"{expression} = {right}"}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def write_jsonl(path: str, rows: list[dict]) -> None:
    import json

    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_arithmetic_files(folder: str) -> None:
    """The shipped configs/data/arithmetic_{train,eval,prefs}.jsonl (preference pairs over train rows only)."""
    from pathlib import Path

    train = arithmetic_rows("train")
    write_jsonl(str(Path(folder) / "arithmetic_train.jsonl"), train)
    write_jsonl(str(Path(folder) / "arithmetic_eval.jsonl"), arithmetic_rows("eval"))
    write_jsonl(str(Path(folder) / "arithmetic_prefs.jsonl"), arithmetic_preference_pairs(train))


if __name__ == "__main__":  # python -m llmrl.data.tasks configs/data/reverse_prefs.jsonl | ... arithmetic configs/data
    # | ... labels configs/data/reverse_labels.jsonl
    import sys

    if sys.argv[1] == "arithmetic":
        write_arithmetic_files(sys.argv[2])
    elif sys.argv[1] == "labels":
        write_labelled_file(sys.argv[2])
    else:
        write_preference_file(sys.argv[1])
