"""How a learned reward model reads a (prompt, completion) pair, for ``text_fn`` in reward configs."""


def spaced_chars(prompt: str, completion: str) -> str:
    """One space between characters, so a WordPiece tokenizer sees one token per letter.

    >>> spaced_chars("abc>", "cba")
    'a b c > c b a'
    """
    return " ".join(prompt + completion)
