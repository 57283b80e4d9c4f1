"""Building a trainer on a tiny model in-process, for tests that need the real pieces together."""
from pathlib import Path

from llmrl.config import load_config

REPO = Path(__file__).resolve().parent.parent


def tiny_config(model_dir, run_dir, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}", "run.progress=false",
        "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2", "ppo.ppo_epochs=2",
        "data.eval_size=8", "run.device=cpu", *overrides,
    ])


def make_trainer(cfg, strategy=None):
    from llmrl.strategy import SingleProcess
    from llmrl.trainer import build_trainer

    return build_trainer(cfg, strategy or SingleProcess("cpu"))
