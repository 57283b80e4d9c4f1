"""``llmrl sft --config C.yaml`` / ``python launch/sft.py --config C.yaml``: supervised fine-tuning on the user's data
(``algorithm: sft`` with an ``sft:`` section; ``llmrl.SFTTrainer`` from Python), or, for a config with a
``warm_start`` section and another algorithm (configs/tiny.yaml), the supervised warm start of its tiny model."""
from __future__ import annotations

from llmrl.demo.warm_start import run_warm_start


def main(argv: list[str] | None = None) -> int:
    from llmrl.config import ConfigError, load_config
    from llmrl.cli.console import config_parser, run_cli

    parser = config_parser("Supervised fine-tuning (algorithm: sft, an sft section), or the supervised warm start "
                           "of a recipe's tiny model (a warm_start section).",
                           "YAML with algorithm: sft and an sft section, or a recipe with a warm_start section")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in run.output_dir (algorithm sft)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest step-N checkpoint in run.output_dir (algorithm sft; written "
                             "every run.save_every steps)")
    args = parser.parse_intermixed_args(argv)

    def body():
        cfg = load_config(args.config, args.overrides)
        if cfg.algorithm == "sft":
            from llmrl.trainers.sft import run_sft

            run_sft(cfg, overwrite=args.overwrite, resume=args.resume)
        elif args.resume:
            raise ConfigError("--resume continues an SFT run (algorithm: sft); the warm start of a recipe's tiny "
                              "model is run again whole")
        else:
            run_warm_start(cfg, progress=cfg.run.progress)

    return run_cli(body)
