"""Rule-based rewards with TRL's signature ``(prompts, completions, **kwargs) -> list[float | None]``.

Each is usable by its built-in name in a config (``function: exact_match``); options come from the
component's ``kwargs`` and dataset columns (e.g. ``answer``) arrive as keyword arguments. Completions may be
texts or, for conversational prompts, TRL's lists of one assistant message: each rule reads the text.
"""
from __future__ import annotations

import re

from llmrl.data.chat import content

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(prompts, completions, answer, **kwargs):
    """1.0 when the completion equals the reference answer (surrounding spaces ignored), else 0.0; None without
    one (a row missing its answer: this reward does not apply, it is never compared with the text "None").

    >>> exact_match(["abc>", "ab>", "a>"], ["cba", "ab", "None"], answer=["cba", "ba", None])
    [1.0, 0.0, None]
    """
    return [None if a is None else float(content(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def numeric_match(prompts, completions, answer, tolerance=1e-6, **kwargs):
    """1.0 when the last number in the completion equals the numeric answer, 0.0 otherwise; None without one.

    >>> numeric_match(["2+2="] * 4, ["4", "it is 4.0", "5", "2+2=4"], answer=[4, "4", 4, None])
    [1.0, 1.0, 0.0, None]
    >>> numeric_match([[{"role": "user", "content": "2+2?"}]], [[{"role": "assistant", "content": "4"}]], answer=[4])
    [1.0]
    """
    scores = []
    for completion, ref in zip(completions, answer):
        if ref is None:
            scores.append(None)  # no reference answer: this reward does not apply
            continue
        found = _NUMBER.findall(content(completion))
        scores.append(float(bool(found) and abs(float(found[-1]) - float(ref)) <= tolerance))
    return scores


def regex_format(prompts, completions, pattern, full=True, **kwargs):
    """1.0 when the completion matches ``pattern`` (the whole completion when ``full``), else 0.0.

    >>> regex_format(["q"] * 3, ["<a>7</a>", "7", "<a>7</a> more"], pattern=r"<a>\\d+</a>")
    [1.0, 0.0, 0.0]
    >>> regex_format(["q"], ["say <a>7</a> more"], pattern=r"<a>\\d+</a>", full=False)
    [1.0]
    """
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.search
    return [float(match(content(c).strip()) is not None) for c in completions]


def length_target(prompts, completions, target=50, tolerance=10, unit="words", **kwargs):
    """1.0 inside target +- tolerance (in words or chars), falling linearly to 0.0 at twice the tolerance away.

    >>> length_target(["q"] * 3, ["a b c", "a b c d e f g", "a"], target=3, tolerance=2)
    [1.0, 0.0, 1.0]
    >>> length_target(["q"], ["abcdef"], target=3, tolerance=2, unit="chars")
    [0.5]
    """
    scores = []
    for c in map(content, completions):
        n = len(c.split()) if unit == "words" else len(c)
        excess = max(0, abs(n - target) - tolerance)
        scores.append(max(0.0, 1.0 - excess / max(tolerance, 1)))
    return scores


def keywords(prompts, completions, include=(), exclude=(), **kwargs):
    """Share of ``include`` words present minus share of ``exclude`` words present (case-insensitive).

    >>> keywords(["q"] * 2, ["The cat sat.", "A dog barked at the cat"], include=["cat", "sat"], exclude=["dog"])
    [1.0, -0.5]
    """
    def share(words, text):
        return sum(re.search(rf"\b{re.escape(w.lower())}\b", text) is not None for w in words) / len(words)

    scores = []
    for c in completions:
        text = content(c).lower()
        score = (share(include, text) if include else 0.0) - (share(exclude, text) if exclude else 0.0)
        scores.append(score)
    return scores


def repetition_penalty(prompts, completions, n=3, **kwargs):
    """Minus the share of repeated word n-grams: 0.0 for no repetition, towards -1.0 for a loop.

    >>> repetition_penalty(["q"] * 3, ["a b c d", "a b a b a b", "a"], n=2)
    [0.0, -0.6, 0.0]
    """
    scores = []
    for c in completions:
        words = content(c).split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        scores.append(len(set(grams)) / len(grams) - 1.0 if grams else 0.0)
    return scores


POSITIVE = frozenset("""good great excellent wonderful amazing love loved lovely best brilliant beautiful
enjoy enjoyed fun funny happy delightful superb perfect fantastic charming moving touching recommend
masterpiece favorite pleasant strong clever fresh warm""".split())
NEGATIVE = frozenset("""bad worst awful terrible boring hate hated poor dull weak stupid waste mess
annoying ugly painful disappointing horrible lame mediocre predictable slow fails failed""".split())


def positive_sentiment(prompts, completions, **kwargs):
    """(#positive - #negative lexicon words) / sqrt(#words + 1): longer texts are not rewarded for length alone.

    >>> positive_sentiment(["The film"], ["was great, great fun"])
    [1.3416407864998738]
    >>> positive_sentiment(["The film"], ["was boring"])
    [-0.5773502691896258]
    """
    scores = []
    for text in map(content, completions):
        words = re.findall(r"[a-z']+", text.lower())
        raw = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        scores.append(raw / (len(words) + 1) ** 0.5)
    return scores
