"""Rewards for llmrl's built-in string tasks (llmrl.tasks)."""


def exact_match(prompts, completions, answer, **kwargs):
    """1.0 when the completion equals the reference answer (surrounding spaces ignored), else 0.0.

    >>> exact_match(["abc>", "ab>"], ["cba", "ab"], answer=["cba", "ba"])
    [1.0, 0.0]
    """
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]
