"""Ready-made rewards with TRL's signature ``(prompts, completions, **kwargs) -> list[float]``."""
