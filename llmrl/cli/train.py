"""``python launch/ppo.py --config configs/tiny.yaml [section.key=value ...] [--resume]``: a whole run. It parses
the command line and calls ``llmrl.RLTrainer``, as a Python program would."""
from __future__ import annotations

import argparse
import json
import sys

from llmrl.api import RLTrainer
from llmrl.cli.console import config_parser, run_cli
from llmrl.config import Config
from llmrl.trainers.base import Interrupted  # noqa: F401 (imported from here before it moved)


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = config_parser(description, "YAML recipe, e.g. configs/tiny.yaml (with --resume: optional, the run's "
                                        "own settings are used; name the run with run.output_dir=RUN)", required=False)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in run.output_dir, with the run's own saved settings: "
                             "give only what changes (e.g. train.total_steps=200)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in run.output_dir (only what a run wrote there is deleted)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_intermixed_args(argv)
    if args.config is None and not args.resume:
        parser.error("--config is required (or --resume run.output_dir=RUN to continue a run with its own settings)")
    if args.config is None and not any(o.split("=", 1)[0].strip() == "run.output_dir" for o in args.overrides):
        parser.error("--resume without --config: name the run to continue, e.g. run.output_dir=runs/tiny")
    return args


def run(cfg: Config | str, resume: bool = False, overwrite: bool = False, overrides: list[str] = ()) -> dict:
    """Train as ``cfg`` (a Config or a YAML path, with ``overrides``) says (``llmrl.RLTrainer``); prints and returns
    the summary written to run_dir/summary.json."""
    result = RLTrainer(cfg, overrides=overrides, resume=resume, overwrite=overwrite).train()
    if result.metrics:  # the main rank: the others read no log
        print(json.dumps({k: v for k, v in result.summary.items() if k != "eval_samples"}, indent=2), flush=True)
    return result.summary


def main(argv: list[str] | None = None) -> int:
    from llmrl.algorithms import ESTIMATORS, OFFLINE

    args = parse_args(argv, f"Fine-tune a causal LM (a LoRA adapter, or all weights with lora: null) with the "
                            f"config's algorithm "
                            f"({', '.join([*ESTIMATORS, *(a for a in OFFLINE if a != 'sft')])}; default ppo; "
                            f"supervised fine-tuning: llmrl sft).")
    return run_cli(lambda: run(args.config, resume=args.resume, overwrite=args.overwrite, overrides=args.overrides))


if __name__ == "__main__":
    sys.exit(main())
