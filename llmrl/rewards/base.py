"""Rewards: any callable ``(prompts, completions, **kwargs) -> list[float | None]`` (TRL's reward signature).

A run's reward is a weighted sum of components, each one of:
- a Python function, named as ``package.module:function``, ``path/to/file.py:function`` or a built-in name
  (``exact_match``, see ``BUILTIN``); plain or ``async``;
- a learned reward model (``llmrl.models.reward_model.LearnedReward``), with its own tokenizer;
- a remote scorer over HTTP (``llmrl.rewards.remote.RemoteReward``).

``None`` from a component means "not applicable to this sample": the sample's score is the weighted sum of
the components that apply. Every value is checked; a bad one stops the run with the reward's name and the
sample index, or, with ``reward.on_error: skip``, drops the sample from training and counts it in a metric.
Nothing is silently turned into 0.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmrl.config import ConfigError, RewardComponentConfig, RewardConfig
from llmrl.data.chat import content
from llmrl.errors import RewardCallFailed, RewardError, first_line  # noqa: F401 (imported from here too)
from llmrl.user_functions import BUILTIN, load_reward_function  # noqa: F401 (imported from here too)

RewardFn = Callable[..., list]

def call_with_timeout(fn: RewardFn, name: str, timeout: float | None, **kwargs) -> Any:
    """Call ``fn(**kwargs)`` (awaiting it if async); a call that outlives ``timeout`` seconds is an error.

    The call runs in a daemon thread: a hung scorer cannot be killed, but it no longer holds the run.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            out = fn(**kwargs)
            if inspect.isawaitable(out):
                out = asyncio.run(_await(out))
            result["value"] = out
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RewardCallFailed(f"reward {name!r} did not return within {timeout:g} s on a batch of "
                          f"{len(kwargs.get('completions', []))} samples: make it faster or raise its timeout")
    if "error" in result:
        e = result["error"]
        raise RewardCallFailed(f"reward {name!r} raised {e!r} on a batch of {len(kwargs.get('completions', []))} "
                          f"samples; fix the function (the run stopped before using this batch)") from e
    return result["value"]


async def _await(awaitable):
    return await awaitable


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for naming a returned value in a one-line message: a
    401-digit number or a big array is abbreviated, and a repr that fails (an int past Python's 4300-digit
    limit for text) does not become the error."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 (a user's object or a huge int: its type still names it)
        if isinstance(value, int):
            return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
        return f"a {type(value).__name__} that cannot be shown"
    text = " ".join(text.split())  # a numpy array's repr spans lines: the message is one
    if len(text) > limit:
        kind = "digits" if isinstance(value, int) else "characters"
        text = f"{text[:limit]}... ({len(text)} {kind})"
    return text


def _as_float(s: Any) -> tuple[float | None, str, str]:
    """``(float(s), "", "")``, or ``(None, what, why)`` for a value that is not a finite number: float() of an int
    past 1.8e308 raises OverflowError, of Decimal('sNaN') ValueError, of a many-element array TypeError."""
    if isinstance(s, (bool, str, bytes)) or not hasattr(s, "__float__"):
        return None, f"{shown(s)} ({type(s).__name__})", "scores must be numbers or None"
    try:
        f = float(s)
    except OverflowError:
        return None, shown(s), ("it is too large for a float (over 1.8e308): scores must be finite numbers, so "
                                "scale it down")
    except Exception as e:  # noqa: BLE001 (the user's value: any failure to convert is a bad score)
        return None, f"{shown(s)} ({type(s).__name__})", (
            f"it is not a number ({type(e).__name__}: {first_line(e, 80)}): scores must be finite numbers or None")
    if not math.isfinite(f):
        return None, str(f), "scores must be finite"
    return f, "", ""


def check_scores(scores: Any, name: str, completions: list[str], invalid: list[int] | None = None
                 ) -> list[float | None]:
    """One finite float or None per completion, or a RewardError naming the reward and the sample.

    With an ``invalid`` list, a bad value (NaN, inf, a number too large for a float, a string) becomes None and
    its index is appended there instead of raising; a wrong count or shape always raises.
    """
    n = len(completions)
    ndim = getattr(scores, "ndim", None)  # a numpy array or a tensor: one score per completion is a 1-D one
    if isinstance(ndim, int) and ndim != 1:
        raise RewardError(f"reward {name!r} returned a {ndim}-D {type(scores).__name__} of shape "
                          f"{tuple(getattr(scores, 'shape', ()))} ({shown(scores)}), not one score per completion: "
                          f"return a list (or 1-D array) of {n} scores (or None), in order")
    if isinstance(scores, (str, bytes, dict, set, frozenset)) or not hasattr(scores, "__len__"):
        raise RewardError(f"reward {name!r} returned {type(scores).__name__}, not a list of floats: return one "
                          f"score (or None) per completion, in order")
    try:
        scores = list(scores)
    except Exception as e:  # noqa: BLE001 (a __len__ without iteration, a 0-d array of another library)
        raise RewardError(f"reward {name!r} returned {type(scores).__name__} {shown(scores)}, which cannot be read "
                          f"as a list ({type(e).__name__}: {first_line(e, 80)}): return a list of {n} scores (or "
                          f"None), in order") from None
    if len(scores) != n:
        raise RewardError(f"reward {name!r} returned {len(scores)} values for {n} completions: "
                          f"return exactly one score (or None) per completion")
    out: list[float | None] = []
    for i, s in enumerate(scores):
        if s is None:
            out.append(None)
            continue
        value, what, why = _as_float(s)
        if value is not None:
            out.append(value)
            continue
        if invalid is None:
            raise RewardError(f"reward {name!r} returned {what} for sample {i}: {why}. Completion: "
                              f"{content(completions[i])[:80]!r}")
        invalid.append(i)
        out.append(None)
    return out


def call_reward(fn: RewardFn, name: str, prompts: list[str], completions: list[str], timeout: float | None = None,
                invalid: list[int] | None = None, **kwargs) -> list[float | None]:
    """Call one reward and check what it returned (see ``check_scores`` for ``invalid``)."""
    raw = call_with_timeout(fn, name, timeout, prompts=prompts, completions=completions, **kwargs)
    return check_scores(raw, name, completions, invalid)


@dataclass
class Component:
    name: str
    fn: RewardFn
    weight: float = 1.0
    timeout: float | None = None
    kwargs: dict = field(default_factory=dict)  # static extra keyword arguments from the config


@dataclass
class RewardResult:
    scores: list[float]  # weighted sum per sample (0.0 where skipped: never used, see ``valid``)
    valid: list[bool]  # False: no component applied or a component failed under on_error: skip
    metrics: dict[str, float]


class CombinedReward:
    """The reward of a run: the weighted sum of its components over the samples each applies to."""

    def __init__(self, components: list[Component], on_error: str = "raise"):
        self.components = components
        self.on_error = on_error

    @property
    def name(self) -> str:
        return "+".join(c.name for c in self.components)

    def missing_arguments(self, given: set[str]) -> dict[str, list[str]]:
        """Component name -> the arguments it requires that neither ``given`` (the names a call passes) nor its
        own kwargs hold; a component whose signature cannot be read is left out (found out when called)."""
        missing = {}
        for c in self.components:
            try:
                params = inspect.signature(c.fn).parameters.values()
            except (TypeError, ValueError):
                continue
            lacking = [p.name for p in params if p.default is p.empty and p.name not in given | set(c.kwargs)
                       and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if lacking:
                missing[c.name] = lacking
        return missing

    def check_arguments(self, columns: set[str], source: str) -> None:
        """At start-up: every argument a component requires is one llmrl passes. It passes prompts,
        completions, completion_ids, the data's other ``columns`` and the component's own kwargs."""
        for c in self.components:
            try:
                params = inspect.signature(c.fn).parameters.values()
            except (TypeError, ValueError):  # no signature to read (some builtins): found out at the first call
                continue
            given = {"prompts", "completions", "completion_ids", *columns, *c.kwargs}
            missing = [p.name for p in params if p.default is p.empty and p.name not in given
                       and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            takes = {p.name for p in params} | {"**" for p in params if p.kind == p.VAR_KEYWORD}
            if missing and not takes & {"completions", "completion_ids", "**"}:
                raise ConfigError(
                    f"reward '{c.name}' takes {', '.join(map(repr, missing))} but no completions: if it is a factory "
                    f"that returns the reward (like trl.rewards:get_soft_overlong_punishment), give those arguments "
                    f"in the component's factory_kwargs")
            if missing:
                raise ConfigError(
                    f"reward '{c.name}' requires {', '.join(map(repr, missing))}, but it is called with prompts, "
                    f"completions, completion_ids and the other columns of data.source = {source!r} "
                    f"({', '.join(sorted(columns)) or 'it has none'}): add such a column to the data, give a value "
                    f"in the reward's kwargs, or take TRL's signature f(prompts, completions, **kwargs)")

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> RewardResult:
        n = len(completions)
        total = [0.0] * n
        applied = [False] * n
        failed = [False] * n
        metrics: dict[str, float] = {}
        skip = self.on_error == "skip"
        for c in self.components:
            invalid: list[int] | None = [] if skip else None
            try:
                values = call_reward(c.fn, c.name, prompts, completions, c.timeout, invalid, **c.kwargs, **kwargs)
                errors = 0
            except RewardError:
                if not skip:
                    raise
                # The whole call failed: no sample has its full reward, so none of them is trained on.
                values, errors = [None] * n, 1
                failed = [True] * n
            for i in invalid or []:
                failed[i] = True
            for i, v in enumerate(values):
                if v is not None:
                    total[i] += c.weight * v
                    applied[i] = True
            present = [v for v in values if v is not None]
            metrics[f"reward/{c.name}/mean"] = sum(present) / len(present) if present else math.nan
            metrics[f"reward/{c.name}/none_rate"] = 1.0 - len(present) / n
            if skip:
                metrics[f"reward/{c.name}/errors"] = float(errors)
                metrics[f"reward/{c.name}/invalid"] = float(len(invalid or []))
            for key, value in getattr(c.fn, "last_metrics", {}).items():
                metrics[f"reward/{c.name}/{key}"] = value
        valid = [a and not f for a, f in zip(applied, failed)]
        if not any(applied) and not any(failed):
            raise RewardError(
                f"reward {self.name!r} returned None for all {n} samples of a batch: None means 'does not apply' "
                f"(TRL's convention), so there is nothing to train on. Check that the data holds what the reward "
                f"reads (e.g. trl.rewards:accuracy_reward needs a 'solution' column it can parse), or add a "
                f"component that scores these samples")
        if not all(applied) and not skip:
            i = applied.index(False)
            raise RewardError(f"no reward applies to sample {i} (every component returned None): return a score "
                              f"for it, or set reward.on_error: skip. Completion: {content(completions[i])[:80]!r}")
        metrics["reward/skipped"] = float(n - sum(valid))
        return RewardResult([t if ok else 0.0 for t, ok in zip(total, valid)], valid, metrics)


def component_name(cfg: RewardComponentConfig) -> str:
    if cfg.name:
        return cfg.name
    if cfg.function:
        return cfg.function.rsplit(":", 1)[-1]
    if cfg.model:
        return Path(cfg.model.rstrip("/")).name or "model"
    return "remote"


def build_component(cfg: RewardComponentConfig, key: str, device) -> Component:
    kinds = [k for k in ("function", "model", "url") if getattr(cfg, k)]
    if len(kinds) != 1:
        raise ConfigError(f"{key} must set exactly one of function, model or url, got "
                          f"{', '.join(kinds) if kinds else 'none'}")
    name = component_name(cfg)
    if cfg.factory_kwargs is not None and not cfg.function:
        raise ConfigError(f"{key}.factory_kwargs is set without a function: it gives the arguments of a reward "
                          f"factory named in {key}.function")
    if cfg.function:
        fn = load_reward_function(cfg.function, f"{key}.function")
        if cfg.factory_kwargs is not None:
            fn = build_from_factory(fn, cfg.function, cfg.factory_kwargs, key)
    elif cfg.model:
        from llmrl.models.reward_model import LearnedReward

        fn = LearnedReward(cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length,
                           quantization=cfg.quantization, device=device, key=f"{key}.model", text_fn=cfg.text_fn)
    else:
        from llmrl.rewards.remote import RemoteReward

        fn = RemoteReward(cfg.url, timeout=cfg.timeout, retries=cfg.retries, token_env=cfg.token_env,
                          key=f"{key}.url")
        fn.check_reachable()
    # A remote reward enforces its own timeout per attempt; the call as a whole may take all retries.
    timeout = None if cfg.url else cfg.timeout
    return Component(name, fn, cfg.weight, timeout, dict(cfg.kwargs))


def build_from_factory(factory: Callable, spec: str, kwargs: dict, key: str) -> RewardFn:
    """The reward a factory returns, e.g. ``trl.rewards:get_soft_overlong_punishment(max_completion_len=...)``."""
    try:
        fn = factory(**kwargs)
    except Exception as e:  # a wrong argument name or value: the factory's own message says which
        raise ConfigError(f"{key}.function = {spec!r} called with factory_kwargs {kwargs} raised {e!r}: give the "
                          f"arguments the factory takes") from e
    if not callable(fn):
        raise ConfigError(f"{key}.function = {spec!r} called with factory_kwargs returned {type(fn).__name__}, not a "
                          f"reward function: factory_kwargs is for functions that return the reward")
    return fn


def build_reward(cfg: RewardConfig, device=None) -> CombinedReward:
    """The CombinedReward a config describes; every import, model and URL is checked here, at start-up."""
    if cfg.function and cfg.components:
        raise ConfigError("reward.function and reward.components are both set: use function for one reward, "
                          "components for several")
    specs = cfg.components or [RewardComponentConfig(function=cfg.function, timeout=cfg.timeout)]
    components = [build_component(spec, f"reward.components[{i}]" if cfg.components else "reward", device)
                  for i, spec in enumerate(specs)]
    seen: dict[str, int] = {}
    for c in components:  # metric names must be unique
        seen[c.name] = seen.get(c.name, 0) + 1
        if seen[c.name] > 1:
            c.name = f"{c.name}_{seen[c.name]}"
    return CombinedReward(components, cfg.on_error)


def build_eval_reward(cfg: RewardConfig) -> CombinedReward | None:
    """The reward that scores evaluations when ``reward.eval_function`` is set (else the training reward)."""
    if not cfg.eval_function:
        return None
    return build_reward(RewardConfig(function=cfg.eval_function, timeout=cfg.timeout, on_error=cfg.on_error))
