"""Logged feedback for offline RL: a deployed model's answers with a reward (ILQL) or a thumbs up/down (KTO).

Two plain formats, read from .jsonl/.json/.csv/.parquet files or ``datasets`` names like prompts are:

- rewarded (``ilql.data``): ``prompt`` (text or TRL messages), ``completion`` (text, one assistant message, or a
  conversation continuing the prompt: assistant turns with the user's or a tool's turns between them, the reward
  given at its end) and ``reward`` (a finite number);
- labelled (``kto.data``): TRL's unpaired preference format, ``prompt``, ``completion`` and ``label`` (true for a
  desirable answer, false for an undesirable one; a CSV file's ``true``/``false`` text counts).

Every row is checked before training; a bad one is refused with one line naming its row (counting from 0) and what
to do. Rows come back as dicts with those three keys, the reward a float, the label a bool.
"""
from __future__ import annotations

import math
from typing import Any

from llmrl.config import ConfigError
from llmrl.data.chat import is_conversation, message_problem
from llmrl.data.prompts import read_table

COLUMNS = {"reward": ("prompt", "completion", "reward"), "label": ("prompt", "completion", "label")}
WHAT = {"reward": "logged answers with a reward need prompt, completion and reward (a number)",
        "label": "logged answers with a thumbs up or down need prompt, completion and label (true/false), TRL's "
                 "unpaired preference format"}


def completion_problem(completion: Any, prompt: Any) -> str | None:
    """Why ``completion`` cannot be trained on (with what to do), or None.

    A text completion follows a text or a conversational prompt (then it is the assistant's turn); a list of
    messages needs a conversational prompt, must start with the assistant and hold text in every message."""
    if isinstance(completion, str):
        if not completion.strip():
            return "is empty: an answer needs at least one token to learn from; remove the row"
        if "\x00" in completion:
            return "contains a NUL character (\\x00): the file holds binary or badly converted text; fix the row"
        return None
    problem = message_problem(completion, text=False)
    if problem:
        return f"{problem}: give the answer as text or as assistant messages"
    if not is_conversation(prompt):
        return "is a list of messages but the prompt is text: give both as conversations, or both as text"
    if completion[0]["role"] != "assistant":
        return (f"starts with a {completion[0]['role']!r} message: a logged answer starts with the assistant's turn "
                f"(move the earlier messages into the prompt)")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in completion):
        return "has only empty assistant messages: an answer needs at least one token to learn from; remove the row"
    if any("\x00" in m["content"] for m in completion):
        return "contains a NUL character (\\x00): the file holds binary or badly converted text; fix the row"
    return None


def as_label(value: Any) -> bool | None:
    """A row's label as a bool: True/False, or the text true/false (any case) as a CSV file holds them; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def load_logged(source: str, kind: str, where: str) -> list[dict]:
    """The rows of ``source`` (``kind``: ``"reward"`` or ``"label"``), checked; ``where`` is the config key for
    messages (ilql.data, kto.data)."""
    rows = read_table(source, where)
    if not rows:
        raise ConfigError(f"{where} = {source!r} has no rows: it needs logged answers ({WHAT[kind]})")
    missing = [c for c in COLUMNS[kind] if c not in rows[0]]
    if missing:
        raise ConfigError(f"{where} = {source!r} lacks column(s) {', '.join(missing)}: {WHAT[kind]} (columns: "
                          f"{', '.join(rows[0])})")
    out = []
    for i, row in enumerate(rows):
        at = f"{where} = {source!r}: row {i} (counting from 0)"
        problem = message_problem(row["prompt"])
        if problem:
            raise ConfigError(f"{at}: its prompt {problem}")
        problem = completion_problem(row["completion"], row["prompt"])
        if problem:
            raise ConfigError(f"{at}: its completion {problem}")
        value = row[kind]
        if kind == "reward":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{at}: its reward is {value!r}: it must be a finite number (fix or remove the "
                                  f"row)")
            value = float(value)
        else:
            value = as_label(value)
            if value is None:
                raise ConfigError(f"{at}: its label is {row['label']!r}: it must be true (a desirable answer) or "
                                  f"false (an undesirable one)")
        out.append({"prompt": row["prompt"], "completion": row["completion"], kind: value})
    if kind == "label" and len({r["label"] for r in out}) < 2:
        which = "true" if out[0]["label"] else "false"
        raise ConfigError(f"{where} = {source!r}: every label is {which}: KTO needs both desirable (true) and "
                          f"undesirable (false) answers; add rows of the other kind, or train on the "
                          f"{'positives with llmrl sft' if which == 'true' else 'data with another method'}")
    return out


def load_rewarded(source: str, where: str = "ilql.data") -> list[dict]:
    """ILQL's rows: ``{"prompt", "completion", "reward": float}``."""
    return load_logged(source, "reward", where)


def load_labelled(source: str, where: str = "kto.data") -> list[dict]:
    """KTO's rows: ``{"prompt", "completion", "label": bool}``."""
    return load_logged(source, "label", where)


def logged_text(tokenizer, prompt: Any, completion: Any) -> tuple[str, str]:
    """(the prompt as the policy reads it, the answer's text after it). A text answer follows the prompt (rendered
    with the chat template and its generation prompt when it is a conversation); a conversation of several turns is
    the chat template's text of prompt + completion, split where the prompt's generation prompt ends."""
    from llmrl.data.chat import render_prompt

    head = render_prompt(tokenizer, prompt, "a logged prompt")
    if isinstance(completion, str):
        return head, completion
    whole = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not whole.startswith(head):  # a template that renders the prompt differently inside a longer conversation
        return head, whole
    return head, whole[len(head):]


def check_logged_lengths(rows: list[dict], tokenizer, context: int | None, where: str) -> None:
    """Refuse, before training, a row whose prompt and answer (plus EOS) do not fit the model's context."""
    if context is None:
        return
    for i, row in enumerate(rows):
        head, tail = logged_text(tokenizer, row["prompt"], row["completion"])
        if len(head) + len(tail) > 16 * context:  # tokenising megabytes would hang before the count below
            n = None
        else:
            n = (len(tokenizer(head, add_special_tokens=False)["input_ids"]) +
                 len(tokenizer(tail, add_special_tokens=False)["input_ids"]) + 1)
        if n is None or n > context:
            size = f"{len(head) + len(tail):,} characters" if n is None else f"{n} tokens (with EOS)"
            raise ConfigError(f"{where}: row {i} (counting from 0) has {size}, more than the model's context of "
                              f"{context} tokens: shorten or remove the row")
