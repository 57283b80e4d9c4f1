"""The Python functions a config names: ``package.module:function``, ``path/to/file.py:function``, or a built-in
rule's name (``BUILTIN``). Imported once at start-up, so that a wrong name fails before any training; used for
reward functions and a learned reward model's ``text_fn``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from llmrl.errors import ConfigError

BUILTIN = {
    name: f"reward_models.rules:{name}"
    for name in ("exact_match", "numeric_match", "regex_format", "length_target", "keywords",
                 "repetition_penalty", "positive_sentiment")
}


# Objects a Python program gave llmrl.RLTrainer (reward functions, datasets, an environment class), by the name a
# config records for them: ``in-memory:NAME``. A config naming one in a process that was not given it (a resume
# or export from the command line) gets one line saying so.
IN_MEMORY_PREFIX = "in-memory:"
_IN_MEMORY: dict[str, object] = {}


def register_in_memory(name: str, value: object) -> str:
    """Make ``value`` the object ``in-memory:NAME`` names in this process; returns that spec."""
    _IN_MEMORY[name] = value
    return IN_MEMORY_PREFIX + name


def in_memory(spec: str, key: str, what: str) -> object:
    """The object ``spec`` (``in-memory:NAME``) names, or a ConfigError saying how to give it."""
    name = spec[len(IN_MEMORY_PREFIX):]
    if name not in _IN_MEMORY:
        raise ConfigError(f"{key} = {spec!r} was a Python object given to llmrl.RLTrainer ({what}) in another "
                          f"process, and this one was not given it: pass it again to RLTrainer (e.g. to resume or "
                          f"evaluate from Python), or set {key} to a file or an importable 'module:name'")
    return _IN_MEMORY[name]


def load_reward_function(spec: str, key: str = "reward.function") -> Callable:
    """Import ``spec`` once at start-up, so that a wrong path fails before any training."""
    if spec.startswith(IN_MEMORY_PREFIX):
        return in_memory(spec, key, "reward_funcs=")
    spec = BUILTIN.get(spec, spec)
    if ":" not in spec:
        raise ConfigError(f"{key} = {spec!r} must be a built-in name ({', '.join(BUILTIN)}), "
                          f"'package.module:function' or 'path/to/file.py:function'")
    return load_named(spec, key)


def load_named(spec: str, key: str) -> Callable:
    """The callable (a function or a class) ``spec`` names: ``package.module:name`` or ``path/to/file.py:name``.
    A file's folder goes on the import path, so that it may import the modules beside it."""
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"{key} = {spec!r}: file {target!r} does not exist")
        # Its folder goes on the import path, as for a script run from there: the file may import the modules
        # beside it.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_spec = importlib.util.spec_from_file_location(f"llmrl_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"{key} = {spec!r}: importing {target!r} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"{key} = {spec!r}: cannot import {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{key} = {spec!r}: {target!r} has no callable named {name!r}")
    return fn
