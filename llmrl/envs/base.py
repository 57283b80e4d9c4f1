"""Finding and building the environment ``env.name`` names, and checking what it returns."""
from __future__ import annotations

import math
from numbers import Real

from llmrl.errors import ConfigError, EnvError, UserError

BUILTIN_ENVS = {
    "guess_number": "llmrl.envs.guess_number:GuessNumber",
    "calculator": "llmrl.envs.tools:CalculatorArithmetic",
    "python_tool": "llmrl.envs.tools:PythonArithmetic",
}


def env_class(spec: str, key: str = "env.name") -> type:
    """The class ``spec`` names: a built-in name, ``package.module:Class`` or ``path/to/file.py:Class``."""
    from llmrl.user_functions import IN_MEMORY_PREFIX, in_memory, load_named

    if spec.startswith(IN_MEMORY_PREFIX):
        return in_memory(spec, key, "env=")
    target = BUILTIN_ENVS.get(spec, spec)
    if ":" not in target:
        raise ConfigError(f"{key} = {spec!r} must be a built-in environment ({', '.join(BUILTIN_ENVS)}), "
                          f"'package.module:Class' or 'path/to/file.py:Class'")
    cls = load_named(target, key)
    if not hasattr(cls, "reset"):
        raise ConfigError(f"{key} = {spec!r} has no reset method: name a gymnasium.Env subclass (reset(seed, options) "
                          f"and step(action)), or a TRL-style environment (reset() and tool methods)")
    return cls


def make_env(spec: str, kwargs: dict, key: str = "env.name"):
    """One environment instance (a TRL-style one wrapped, see ``llmrl.envs.trl_style``); a constructor that raises is
    a ConfigError naming ``spec`` and ``kwargs``."""
    from llmrl.envs.trl_style import TRLStyleEnv, is_trl_style

    cls = env_class(spec, key)
    try:
        env = cls(**kwargs)
    except UserError:  # already one line saying what to do (e.g. python_tool without a sandbox)
        raise
    except Exception as e:  # the user's constructor: any exception is a wrong setting
        raise ConfigError(f"{key} = {spec!r}: building it with env.kwargs = {kwargs} raised "
                          f"{type(e).__name__}: {str(e)[:150]}: fix env.kwargs") from None
    return TRLStyleEnv(env) if is_trl_style(cls) else env


def where(name: str, seed, turn: int | None) -> str:
    return f"env {name!r}, episode seed {seed}" + ("" if turn is None else f", turn {turn}")


def checked_reset(env, name: str, seed, options) -> tuple[str, dict]:
    """``env.reset`` with its result checked: (observation text, info)."""
    try:
        out = env.reset(seed=seed, options=options)
    except Exception as e:  # the user's code
        raise EnvError(f"{where(name, seed, None)}: reset raised {type(e).__name__}: {str(e)[:150]}") from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise EnvError(f"{where(name, seed, None)}: reset returned {type(out).__name__} {str(out)[:60]!r}, not "
                       f"(observation, info) as Gymnasium's API has it")
    obs, info = out
    if not isinstance(obs, str):
        raise EnvError(f"{where(name, seed, None)}: reset returned a {type(obs).__name__} observation "
                       f"{str(obs)[:60]!r}: observations must be text (gymnasium.spaces.Text)")
    return obs, info if isinstance(info, dict) else {}


def checked_step(env, name: str, seed, turn: int, action: str) -> tuple[str, float, bool, bool, dict]:
    """``env.step`` with its result checked: (observation, finite reward, terminated, truncated, info)."""
    try:
        out = env.step(action)
    except Exception as e:  # the user's code
        raise EnvError(f"{where(name, seed, turn)}: step raised {type(e).__name__}: {str(e)[:150]}") from None
    if not (isinstance(out, tuple) and len(out) == 5):
        raise EnvError(f"{where(name, seed, turn)}: step returned {type(out).__name__} {str(out)[:60]!r}, not "
                       f"(observation, reward, terminated, truncated, info) as Gymnasium's API has it")
    obs, reward, terminated, truncated, info = out
    if not isinstance(obs, str):
        raise EnvError(f"{where(name, seed, turn)}: step returned a {type(obs).__name__} observation "
                       f"{str(obs)[:60]!r}: observations must be text (gymnasium.spaces.Text)")
    value = None
    if not isinstance(reward, bool) and isinstance(reward, Real):
        try:
            value = float(reward)
        except (OverflowError, ValueError):  # an int past 1.8e308: no float holds it
            pass
    if value is None or not math.isfinite(value):
        from llmrl.rewards.base import shown

        raise EnvError(f"{where(name, seed, turn)}: step returned reward {shown(reward)}: it must be a finite number "
                       f"(a float, at most 1.8e308 in size)")
    return obs, value, bool(terminated), bool(truncated), info if isinstance(info, dict) else {}
