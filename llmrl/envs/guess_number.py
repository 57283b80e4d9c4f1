"""Guess the number: the environment picks a secret, the model guesses, and is told higher or lower.

Without the feedback a player finds the secret in ``n`` guesses with chance ``n / size`` at best; with it,
binary search finds any of ``2**n - 1`` numbers. So an episode's success rate shows whether the policy uses
what the environment told it.

Two styles: ``words`` for pretrained models ("Guess my number from 1 to 100..."; "Higher."), and
``symbols`` for the embedded tiny model, whose vocabulary is a few characters: the opening observation is
``?``, feedback is ``+`` (higher) or ``-`` (lower).
"""
from __future__ import annotations

import re
import string

import gymnasium as gym
from gymnasium import spaces

INTEGER = re.compile(r"-?\d+")


class GuessNumber(gym.Env):
    """Reward 1 when the guess is the secret (the episode ends), 0 otherwise; a reply with no number in range
    earns ``invalid_reward`` and ends the episode (or, with ``end_on_invalid=False``, is told so and may guess
    again). ``options={"secret": n}`` fixes the secret."""

    metadata = {"render_modes": []}

    def __init__(self, low: int = 1, high: int = 8, style: str = "symbols", invalid_reward: float = 0.0,
                 end_on_invalid: bool = True):
        if high <= low:
            raise ValueError(f"high ({high}) must be above low ({low})")
        if style not in ("symbols", "words"):
            raise ValueError(f"style is {style!r}: use symbols or words")
        self.low, self.high, self.style, self.invalid_reward = low, high, style, invalid_reward
        self.end_on_invalid = end_on_invalid
        self.observation_space = spaces.Text(max_length=200, charset=string.printable)
        self.action_space = spaces.Text(max_length=200, charset=string.printable)
        self.secret: int | None = None

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        secret = (options or {}).get("secret")
        self.secret = int(secret) if secret is not None else int(self.np_random.integers(self.low, self.high + 1))
        if self.style == "symbols":
            return "?", {"secret": self.secret}
        return (f"Guess my number from {self.low} to {self.high}. I answer Higher or Lower. "
                f"Reply with a number only.", {"secret": self.secret})

    def guess_of(self, action: str) -> int | None:
        text = action.strip()
        if self.style == "symbols":
            return int(text) if text.isdigit() and self.low <= int(text) <= self.high else None
        found = INTEGER.search(text)
        return int(found.group()) if found and self.low <= int(found.group()) <= self.high else None

    def step(self, action: str):
        if self.secret is None:
            raise RuntimeError("step before reset")
        guess = self.guess_of(action)
        if guess is None:
            obs = "!" if self.style == "symbols" else (f"That is not a number from {self.low} to {self.high}. "
                                                       f"Reply with the number only.")
            return obs, self.invalid_reward, self.end_on_invalid, False, {"success": False, "reason": "invalid guess"}
        if guess == self.secret:
            return ("=" if self.style == "symbols" else "Correct!"), 1.0, True, False, {"success": True}
        higher = guess < self.secret
        if self.style == "symbols":
            return ("+" if higher else "-"), 0.0, False, False, {"success": False}
        return ("Higher." if higher else "Lower."), 0.0, False, False, {"success": False}
