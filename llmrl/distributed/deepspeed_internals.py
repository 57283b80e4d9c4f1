"""Every DeepSpeed internal llmrl relies on, in one place. The rest of llmrl uses DeepSpeed's public API only
(``deepspeed.initialize``, the engine's methods, ``deepspeed.zero.GatheredParameters``, ``DeepSpeedCPUAdam``).

Two things need more than that:

- ``zero3_hooks_removed``: a ZeRO-3 rollout with DeepSpeed's module hooks taken off (``DeepSpeed.generation_context``
  says why), which reaches into the engine's parameter-offload object.
- ``checkpoint_classes``: the DeepSpeed classes its checkpoint files pickle, which torch's safe loader must be told.

Checked on DeepSpeed 0.16.6, 0.16.9, 0.17.6, 0.18.9, 0.19.0 and 0.19.8, hence ``TESTED_RANGE``, which pyproject.toml
pins. 0.16.5 and older do not keep the model-level hook's handle (``fwd_pre_hook``; 0.16.0 also names
``_register_deepspeed_module`` ``_register_hooks_recursively``). ``tests/test_deepspeed_internals.py`` builds a
one-rank ZeRO-3 engine and fails, naming the attribute and the installed version, if a release moves any of them;
``missing_internals`` is the check it and ``zero3_hooks_removed`` share.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

from llmrl.errors import UserError

TESTED_RANGE = ">=0.16.6,<0.20"  # the releases above; pyproject.toml pins the same

# What zero3_hooks_removed reads, as dotted paths from the engine for the messages. missing_internals also checks
# each parameter's ``ds_active_sub_modules`` and the model's ``_forward_pre_hooks`` (torch's, not DeepSpeed's).
OFFLOAD = "engine.optimizer.parameter_offload"  # DeepSpeedZeroOptimizer_Stage3 -> its DeepSpeedZeRoOffload
OFFLOAD_ATTRIBUTES = (
    "module",                      # the engine's model, which the hooks are on
    "fwd_pre_hook",                # handle of the model-level pre-forward hook (resets the prefetch trace)
    "forward_hooks",               # handles of the per-submodule hooks that fetch and release weights...
    "backward_hooks",              # ...and the same around backward
    "_register_deepspeed_module",  # (module): puts forward_hooks and backward_hooks back, in DeepSpeed's order
)
CHECKPOINT_CLASSES = (  # (module, class) pickled in DeepSpeed's checkpoint files besides tensors and containers
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def missing_internals(engine) -> list[str]:
    """What ``zero3_hooks_removed`` needs and ``engine`` (a ZeRO-3 ``DeepSpeedEngine``) lacks, as dotted paths;
    empty when all is where this DeepSpeed release is expected to keep it."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:
        return [OFFLOAD]
    missing = [f"{OFFLOAD}.{name}" for name in OFFLOAD_ATTRIBUTES if not hasattr(offload, name)]
    if missing:
        return missing
    try:
        inspect.signature(offload._register_deepspeed_module).bind(offload.module)
    except TypeError:
        missing.append(f"{OFFLOAD}._register_deepspeed_module(module) (its signature is now "
                       f"{inspect.signature(offload._register_deepspeed_module)})")
    hooks = getattr(offload.module, "_forward_pre_hooks", None)
    if hooks is None or getattr(offload.fwd_pre_hook, "id", None) not in hooks:
        missing.append(f"{OFFLOAD}.module._forward_pre_hooks[{OFFLOAD}.fwd_pre_hook.id]")
    if any(not hasattr(p, "ds_active_sub_modules") for p in offload.module.parameters()):
        missing.append(f"{OFFLOAD}.module.parameters()[i].ds_active_sub_modules")
    return missing


def check_internals(engine) -> None:
    """``UserError`` naming what ``missing_internals`` finds, the installed version and the ways out."""
    missing = missing_internals(engine)
    if missing:
        raise UserError(f"DeepSpeed {deepspeed_version()} has moved internals that ZeRO-3 rollouts with gathered "
                        f"weights use ({', '.join(missing)}): set deepspeed.gather_for_generation: false, or install "
                        f"a tested DeepSpeed: pip install 'deepspeed{TESTED_RANGE}'")


@contextmanager
def zero3_hooks_removed(engine):
    """ZeRO-3's module hooks off ``engine``'s model until the block ends, then the same hooks back, in DeepSpeed's
    order. Enter it with every weight already gathered (``deepspeed.zero.GatheredParameters``): without the hooks,
    nothing fetches a partitioned weight.

    Touches, on ``offload = engine.optimizer.parameter_offload`` (a ``DeepSpeedZeRoOffload``): ``offload.module``,
    ``offload.fwd_pre_hook`` (its ``.id`` keys ``module._forward_pre_hooks``, a torch private),
    ``offload.forward_hooks``, ``offload.backward_hooks``, ``offload._register_deepspeed_module(module)``, and
    each parameter's ``ds_active_sub_modules`` (the submodules DeepSpeed thinks are using it: cleared, as the
    post-forward hooks that would clear it are gone). Checked on DeepSpeed ``TESTED_RANGE``.

    Raises ``UserError`` before touching anything if one of them is not there (a DeepSpeed outside that range).
    """
    check_internals(engine)
    offload = engine.optimizer.parameter_offload
    module = offload.module
    start_of_forward = module._forward_pre_hooks[offload.fwd_pre_hook.id]
    for param in module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in (*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook):
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:  # the same hooks again, in DeepSpeed's order
        offload.fwd_pre_hook = module.register_forward_pre_hook(start_of_forward)
        offload._register_deepspeed_module(module)


def checkpoint_classes() -> tuple:
    """The classes DeepSpeed's checkpoint files hold besides tensors and containers: enums and config records, data
    without behaviour on unpickling. Raises ``UserError`` naming the class if a DeepSpeed release moved one."""
    import importlib

    found = []
    for module_name, name in CHECKPOINT_CLASSES:
        try:
            found.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError) as e:
            raise UserError(f"DeepSpeed {deepspeed_version()} has no {module_name}.{name}, which its checkpoint files "
                            f"held in the tested releases ({e}): install a tested DeepSpeed: "
                            f"pip install 'deepspeed{TESTED_RANGE}'") from e
    return tuple(found)
