"""Conversations in TRL's format: a prompt is a text or a list of messages ``{"role": ..., "content": ...}``.

A conversational prompt is rendered with the policy tokenizer's chat template, generation prompt added, and
the sampled text is the assistant's turn. Rewards then get what TRL's trainers give them: the prompts as
they are in the data (lists of messages) and each completion as a list holding one assistant message, so
TRL's own reward functions (``trl.rewards``) run unchanged. Plain-text prompts keep plain-text completions.
"""
from __future__ import annotations

from typing import Any

from llmrl.config import ConfigError


def is_conversation(value: Any) -> bool:
    """Whether ``value`` is a list of messages (TRL's conversational format)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def message_problem(prompt: Any, text: bool = True) -> str | None:
    """Why ``prompt`` is neither a text nor a well-formed conversation, or None when it is one of them.
    ``text``: also why its text is unusable (see ``text_problem``)."""
    if isinstance(prompt, str):
        return text_problem(prompt) if text else None
    if not is_conversation(prompt):
        return f"is {type(prompt).__name__} {str(prompt)[:60]!r}, neither text nor a list of messages"
    for j, m in enumerate(prompt):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"has message {j} = {str(m)[:60]!r}: each message needs a string role and a string content"
    return text_problem(prompt) if text else None


def text_problem(prompt: str | list[dict]) -> str | None:
    """Why a well-formed prompt (a text, or a conversation) cannot be trained on, with what to do; None when it can.

    Empty or only whitespace: nothing to continue from (a chat template still adds tokens, so it would train
    silently). A NUL character: a binary or badly converted file, which tokenizers pass through silently."""
    fix = "fix or remove the row"
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    for j, t in enumerate(texts):
        if "\x00" in t:
            where = "" if isinstance(prompt, str) else f"message {j} "
            return (f"{where}contains a NUL character (\\x00) at position {t.index(chr(0))}: the file holds binary "
                    f"or badly converted text; {fix}")
    if any(t.strip() for t in texts):
        return None
    if isinstance(prompt, str):
        return ("is empty: a prompt needs at least one token to continue from" if not prompt else
                f"is only whitespace ({prompt[:20]!r}): a prompt needs text to continue from; {fix}")
    return f"has only empty or whitespace messages: a prompt needs text to continue from; {fix}"


def render_prompt(tokenizer, prompt: str | list[dict], where: str = "a prompt") -> str:
    """The text the policy continues: ``prompt`` itself, or the conversation through the chat template with the
    generation prompt (the opening of the assistant's turn)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where} is a conversation (a list of messages), but the policy's tokenizer has no chat "
                          f"template: give the prompts as text, or use a model or model.tokenizer that has one")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_prompts(tokenizer, prompts: list) -> list[str]:
    return [render_prompt(tokenizer, p, f"prompt {i}") for i, p in enumerate(prompts)]


def as_completions(prompts: list, texts: list[str]) -> list:
    """What rewards get as completions: the text, or TRL's ``[{"role": "assistant", "content": text}]`` where
    the prompt is a conversation."""
    return [[{"role": "assistant", "content": t}] if is_conversation(p) else t for p, t in zip(prompts, texts)]


def content(value: Any) -> str:
    """The text of a completion or a prompt: itself, or the content of the last message of a conversation.

    >>> content([{"role": "assistant", "content": "4"}]), content("4")
    ('4', '4')
    """
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return value if isinstance(value, str) else str(value)


def plain_conversation(messages: list[dict]) -> str:
    """A conversation as plain text, for a tokenizer without a chat template: one ``role: content`` line each.

    >>> plain_conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    'user: 2+2?\\nassistant: 4'
    """
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
