"""``python launch/ppo.py --config configs/tiny.yaml [section.key=value ...] [--resume]``: a whole run. It parses
the command line and calls ``llmrl.RLTrainer``, as a Python program would."""
from __future__ import annotations

import argparse
import json
import sys

from llmrl.api import RLTrainer
from llmrl.cli.console import config_parser, run_cli
from llmrl.config import Config, load_config
from llmrl.trainers.base import Interrupted  # noqa: F401 (imported from here before it moved)


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = config_parser(description, "YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in run.output_dir (only what a run wrote there is deleted)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_intermixed_args(argv)


def run(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train as ``cfg`` says (``llmrl.RLTrainer``); prints and returns the summary written to run_dir/summary.json."""
    result = RLTrainer(cfg, resume=resume, overwrite=overwrite).train()
    if result.metrics:  # the main rank: the others read no log
        print(json.dumps({k: v for k, v in result.summary.items() if k != "eval_samples"}, indent=2), flush=True)
    return result.summary


def main(argv: list[str] | None = None) -> int:
    from llmrl.algorithms import ESTIMATORS, OFFLINE

    args = parse_args(argv, f"Fine-tune a causal LM on a LoRA adapter with the config's algorithm "
                            f"({', '.join([*ESTIMATORS, *OFFLINE])}; default ppo).")
    return run_cli(lambda: run(load_config(args.config, args.overrides), resume=args.resume,
                               overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
