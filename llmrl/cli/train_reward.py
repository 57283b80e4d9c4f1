"""``llmrl train-reward`` / ``python launch/train_reward.py --config configs/reward_minilm.yaml``."""
from __future__ import annotations

from llmrl.config import RewardTrainConfig, load_config
from llmrl.trainers.reward import train_reward_model


def main(argv: list[str] | None = None) -> int:
    from llmrl.cli.console import config_parser, run_cli

    parser = config_parser("Train a Bradley-Terry reward model from preference pairs.",
                           "YAML, e.g. configs/reward_minilm.yaml",
                           overrides_help="single-key overrides: key=value (e.g. max_steps=50)")
    args = parser.parse_intermixed_args(argv)
    return run_cli(lambda: train_reward_model(load_config(args.config, args.overrides, RewardTrainConfig)))
