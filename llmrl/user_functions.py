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


def load_reward_function(spec: str, key: str = "reward.function") -> Callable:
    """Import ``spec`` once at start-up, so that a wrong path fails before any training."""
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
