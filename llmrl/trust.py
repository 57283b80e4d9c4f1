"""What a config would run that is not llmrl's: model code from the hub, reward and environment files and modules,
servers.

A user's own config (``--config``) is trusted: it names what to import. A checkpoint's ``config.yaml`` is not:
a downloaded checkpoint could name any file, module or URL. ``llmrl eval`` and export read it, so they refuse
what ``untrusted_parts`` lists unless the user passes ``--trust-checkpoint-code``.
"""
from __future__ import annotations

from pathlib import Path

from llmrl.config import Config, ConfigError

# Installed code that a checkpoint may name: llmrl's own rules and text formats, TRL's shipped rewards.
SAFE_MODULES = ("reward_models.", "llmrl.", "trl.rewards")
FLAG = "--trust-checkpoint-code"


def safe_function(spec: str | None) -> bool:
    from llmrl.user_functions import BUILTIN, IN_MEMORY_PREFIX

    if not spec or spec in BUILTIN or spec.startswith(IN_MEMORY_PREFIX):
        return True  # in-memory: an object this process's own program gave llmrl.RLTrainer; nothing is imported
    target = spec.rsplit(":", 1)[0]
    return not target.endswith(".py") and (target + ".").startswith(SAFE_MODULES) or target in ("trl.rewards",)


def untrusted_parts(cfg: Config, rewards: bool = True) -> list[str]:
    """The settings of ``cfg`` that would run code or reach a server beyond llmrl's own and TRL's rewards
    (``rewards``: the reward section too; export builds no reward)."""
    found = []
    if cfg.model.trust_remote_code:
        found.append("model.trust_remote_code: true (model code from the hub)")
    if not rewards:
        return found
    from llmrl.envs import BUILTIN_ENVS

    if cfg.env.name and cfg.env.name not in BUILTIN_ENVS and not cfg.env.name.startswith(("llmrl.", "in-memory:")):
        found.append(f"env.name = {cfg.env.name!r} (an environment's code)")
    r = cfg.reward
    for key, spec in (("reward.function", r.function), ("reward.eval_function", r.eval_function)):
        if not safe_function(spec):
            found.append(f"{key} = {spec!r}")
    for i, c in enumerate(r.components):
        for name in ("function", "text_fn"):
            if not safe_function(getattr(c, name)):
                found.append(f"reward.components[{i}].{name} = {getattr(c, name)!r}")
        if c.url:
            found.append(f"reward.components[{i}].url = {c.url!r} (a server)")
    return found


def check_checkpoint_config(cfg: Config, checkpoint: Path, trusted: bool, rewards: bool = True) -> None:
    """Refuse a checkpoint's own config that would run code or reach a server, unless the user allowed it."""
    found = [] if trusted else untrusted_parts(cfg, rewards)
    if found:
        raise ConfigError(f"{Path(checkpoint) / 'config.yaml'} asks for {'; '.join(found)}: code and servers named "
                          f"by a checkpoint are used only when you allow it: pass {FLAG} if you trust this "
                          f"checkpoint, or --config with a config of your own")


def check_checkpoint_algorithm(config_path: Path, overrides: list[str] | tuple[str, ...], trusted: bool) -> None:
    """Refuse, before the config is loaded (loading imports the estimator it names), a checkpoint's
    ``algorithm: file.py:Class`` or ``module:Class`` outside llmrl, unless the user allowed it or set the
    algorithm on the command line."""
    import yaml

    if trusted or any(o.split("=", 1)[0].strip() == "algorithm" for o in overrides):
        return
    try:
        algorithm = (yaml.safe_load(Path(config_path).read_text()) or {}).get("algorithm")
    except (OSError, yaml.YAMLError, AttributeError):
        return  # load_config names the problem
    if isinstance(algorithm, str) and ":" in algorithm and not safe_function(algorithm):
        raise ConfigError(f"{config_path} asks for algorithm = {algorithm!r} (an estimator's code): code named by "
                          f"a checkpoint is used only when you allow it: pass {FLAG} if you trust this checkpoint, "
                          f"or --config with a config of your own")
