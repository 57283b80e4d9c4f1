"""``llmrl sft`` / ``python launch/sft.py --config configs/tiny.yaml``: the supervised warm start of a recipe."""
from __future__ import annotations

from llmrl.demo.warm_start import run_warm_start


def main(argv: list[str] | None = None) -> int:
    from llmrl.config import load_config
    from llmrl.cli.console import config_parser, run_cli

    parser = config_parser("Supervised warm start of a recipe's tiny model.", "YAML recipe with a warm_start section")
    args = parser.parse_intermixed_args(argv)

    def body():
        cfg = load_config(args.config, args.overrides)
        run_warm_start(cfg, progress=cfg.run.progress)

    return run_cli(body)
