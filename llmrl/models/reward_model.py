"""Learned reward models: any ``AutoModelForSequenceClassification`` with one output, with its own tokenizer.

The policy's completions are scored as text: prompt and completion are joined (with the reward model's
chat template when it has one, else by ``text_fn`` or plain concatenation) and re-tokenised with the reward
model's tokenizer, so the two models need not share a vocabulary. Texts longer than ``max_length`` lose
their beginning (the end of a completion matters most) and are counted in ``last_metrics["truncated"]``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from llmrl.config import ConfigError
from llmrl.data.chat import content, is_conversation, plain_conversation
from llmrl.errors import first_line
from llmrl.models.sources import resolve_model

META_FILE = "llmrl_reward.json"  # written by launch/train_reward.py: how the model expects its text


def chosen_text_fn(path: str, text_fn: str | None, key: str) -> str | None:
    """The ``text_fn`` to import: the config's own. One saved in the model folder (by train_reward) is code named
    by a folder, so it is used only when the config asks for it (``text_fn: saved``, or the same name)."""
    meta = Path(path) / META_FILE
    try:
        saved = json.loads(meta.read_text()).get("text_fn") if meta.is_file() else None
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{key}: {meta} is not the JSON object train_reward writes ({e}): remove it or "
                          f"retrain the reward model") from None
    if text_fn == "saved":
        if saved is None:
            raise ConfigError(f"{key}: text_fn is 'saved' but {meta} names no text_fn")
        return saved
    if text_fn is None and saved is not None:
        raise ConfigError(f"{key}: the reward model was trained reading texts through text_fn {saved!r} (saved in "
                          f"{meta}); llmrl imports code a model folder names only when the config asks: set "
                          f"text_fn: {saved} (or text_fn: saved) in this reward component")
    return text_fn


def load_text_fn(spec: str | None) -> Callable[[str, str], str] | None:
    if spec is None:
        return None
    from llmrl.user_functions import load_reward_function  # same import rules: module:function or file.py:function

    return load_reward_function(spec, "text_fn")


def format_texts(tokenizer, prompts: list, completions: list, text_fn=None) -> list[str]:
    """What the reward model reads for each (prompt, completion) pair; training and scoring share this.

    A prompt is a text or a conversation (TRL's list of messages); a completion is a text or TRL's list of
    one assistant message. ``text_fn(prompt, completion_text)`` decides when given; otherwise the reward
    model's own chat template renders the conversation with the completion as the assistant's turn (a text
    prompt is one user message), and without a template the texts are joined (a conversation as
    ``role: content`` lines).
    """
    texts = [content(c) for c in completions]
    if text_fn is not None:
        return [text_fn(p, c) for p, c in zip(prompts, texts)]
    out = []
    for p, c in zip(prompts, texts):
        messages = (p if is_conversation(p) else [{"role": "user", "content": str(p)}]) + \
            [{"role": "assistant", "content": c}]
        if getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            out.append(plain_conversation(messages) if is_conversation(p) else str(p) + c)
    return out


def load_reward_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"reward model tokenizer at {path!r} has neither a pad nor an EOS token: add one")
        tokenizer.pad_token = tokenizer.eos_token  # attention masks keep padding out of the score
    return tokenizer


class LearnedReward:
    """A reward callable backed by a sequence-classification model (Bradley-Terry reward model)."""

    def __init__(self, model: str, batch_size: int = 32, max_length: int = 512, quantization: str | None = None,
                 device: torch.device | None = None, key: str = "reward.model", text_fn: str | None = None):
        from transformers import AutoModelForSequenceClassification

        from llmrl.models.policy import disable_dropout

        path = resolve_model(model, key)
        self.text_fn = load_text_fn(chosen_text_fn(path, text_fn, key))
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{key} = {model!r} is a folder without config.json: point it at a saved reward model "
                              f"(launch/train_reward.py writes one)")
        try:
            self.tokenizer = load_reward_tokenizer(path)
        except ConfigError:
            raise
        except Exception as e:  # transformers raises many types for a missing or damaged folder
            first = first_line(e)
            raise ConfigError(f"{key} = {model!r}: no tokenizer could be loaded from it ({first}): point it at a "
                              f"reward model folder, or a hub name available offline") from None
        self.batch_size, self.max_length = batch_size, max_length
        self.device = device or torch.device("cpu")
        kwargs = {}
        if quantization == "8bit":
            from transformers import BitsAndBytesConfig

            kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": self.device}}
        elif quantization is not None:
            raise ConfigError(f"{key}: quantization {quantization!r} is not supported for reward models: use 8bit "
                              f"or null")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        except Exception as e:  # a damaged config.json or weights file, an architecture without such a head
            first = first_line(e)
            raise ConfigError(f"{key} = {model!r} could not be loaded as a sequence-classification model "
                              f"({first})") from None
        if self.model.config.num_labels != 1:
            raise ConfigError(f"{key} = {model!r} has num_labels = {self.model.config.num_labels}: a reward model "
                              f"outputs one score (train it with launch/train_reward.py)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if quantization is None:
            self.model.to(self.device)
        disable_dropout(self.model)
        self.model.eval()
        self.last_metrics: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = format_texts(self.tokenizer, prompts, completions, self.text_fn)
        scores, truncated = [], 0
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            lengths = [len(ids) for ids in self.tokenizer(batch)["input_ids"]]
            truncated += sum(n > self.max_length for n in lengths)
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        self.last_metrics = {"truncated": float(truncated)}
        return scores
