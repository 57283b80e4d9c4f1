"""A small sentiment lexicon reward: positive words minus negative words, per word of the completion."""
import re

POSITIVE = frozenset("""good great excellent wonderful amazing love loved lovely best brilliant beautiful
enjoy enjoyed fun funny happy delightful superb perfect fantastic charming moving touching recommend
masterpiece favorite pleasant strong clever fresh warm""".split())
NEGATIVE = frozenset("""bad worst awful terrible boring hate hated poor dull weak stupid waste mess
annoying ugly painful disappointing horrible lame mediocre predictable slow fails failed""".split())


def positive_sentiment(prompts, completions, **kwargs):
    """(#positive - #negative) / sqrt(#words + 1), so longer texts are not rewarded for length alone.

    >>> positive_sentiment(["The film"], ["was great, great fun"])
    [1.3416407864998738]
    >>> positive_sentiment(["The film"], ["was boring"])
    [-0.5773502691896258]
    """
    scores = []
    for text in completions:
        words = re.findall(r"[a-z']+", text.lower())
        raw = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        scores.append(raw / (len(words) + 1) ** 0.5)
    return scores
