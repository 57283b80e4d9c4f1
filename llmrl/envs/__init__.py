"""Environments the policy acts in, turn by turn: Gymnasium's API with text observations and text actions.

An environment is any ``gymnasium.Env`` whose ``reset(seed=None, options=None)`` returns ``(observation, info)`` and
whose ``step(action)`` returns ``(observation, reward, terminated, truncated, info)``, the observations and actions
being strings (``gymnasium.spaces.Text``). ``env.name`` in the config names a built-in one or a class of the
user's (``path/to/file.py:Class``, ``package.module:Class``), built with ``env.kwargs``. The episode loop, the
token bookkeeping and the loss mask are in ``llmrl.rollout.episodes``.

Built in: ``guess_number`` (a game that needs the feedback), ``calculator`` (arithmetic with a calculator tool),
``python_tool`` (arithmetic with a Python sandbox as the tool).
"""
from __future__ import annotations

from llmrl.envs.base import BUILTIN_ENVS, env_class, make_env

__all__ = ["BUILTIN_ENVS", "env_class", "make_env"]
