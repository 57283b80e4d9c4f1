"""An environment written for TRL's ``environment_factory`` (GRPOTrainer), run as a Gymnasium one.

TRL's shape: ``reset()`` returns None or a text appended to the prompt; public methods are tools the model calls;
an optional ``get_reward()`` scores the finished episode from the environment's state. Here a model turn that
holds a tool call, ``{"name": METHOD, "arguments": {...}}`` (inside ``<tool_call>`` tags or not), calls the
method and shows its result; a turn without one ends the episode, scored by ``get_reward()`` (0 without it).
What is not supported: TRL's dictionary of several environments, tool schemas put into the chat template, and
several tool calls in one turn (the first is called).
"""
from __future__ import annotations

import inspect
import json
import re

CALL = re.compile(r"\{.*\}", re.DOTALL)


def is_trl_style(cls) -> bool:
    return hasattr(cls, "reset") and not hasattr(cls, "step")


def tool_names(env) -> list[str]:
    return [name for name, member in inspect.getmembers(env, callable)
            if not name.startswith("_") and name not in ("reset", "get_reward")]


class TRLStyleEnv:
    """Gymnasium's ``reset``/``step`` around a TRL-style environment instance."""

    def __init__(self, inner):
        self.inner = inner
        self.tools = tool_names(inner)

    def reset(self, seed=None, options=None):
        text = self.inner.reset()
        prompt = str((options or {}).get("prompt", ""))
        observation = "\n".join(part for part in (prompt, text or "") if part)
        return observation, {"tools": self.tools}

    def call_of(self, action: str):
        found = CALL.search(action)
        if not found:
            return None
        try:
            call = json.loads(found.group())
        except ValueError:
            return None
        if not isinstance(call, dict) or call.get("name") not in self.tools:
            return None
        arguments = call.get("arguments", {})
        return call["name"], arguments if isinstance(arguments, dict) else {}

    def step(self, action: str):
        call = self.call_of(action)
        if call is None:  # a final answer: the environment scores the episode
            reward = float(self.inner.get_reward()) if hasattr(self.inner, "get_reward") else 0.0
            return "", reward, True, False, {}
        name, arguments = call
        try:
            result = getattr(self.inner, name)(**arguments)
        except Exception as e:  # the user's tool: its failure ends the episode, not the run
            return (f"{name} failed: {type(e).__name__}: {str(e)[:100]}", 0.0, True, False,
                    {"reason": f"tool error: {type(e).__name__}: {str(e)[:100]}"})
        return str(result), 0.0, False, False, {"tool_call": name}
