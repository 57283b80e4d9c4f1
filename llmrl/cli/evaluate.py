"""``llmrl eval --checkpoint RUN/final``: reward before/after and KL to the base, eval.json and eval.md."""
from __future__ import annotations

from pathlib import Path

from llmrl.trainers.evaluate import evaluate_checkpoint


def main(argv: list[str] | None = None) -> int:
    from llmrl.cli.console import config_parser, run_cli

    parser = config_parser("Evaluate a checkpoint: reward before/after and KL to the base on held-out prompts; "
                           "writes eval.json and eval.md.", "YAML (default: the checkpoint's own config.yaml)",
                           required=False)
    parser.add_argument("--checkpoint", required=True, help="a run's final/ or step-N/ folder")
    parser.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval)")
    parser.add_argument("--samples", type=int, default=8, help="generations shown in the table")
    parser.add_argument("--trust-checkpoint-code", action="store_true",
                        help="let the checkpoint's own config.yaml run model code from the hub and import the reward "
                             "files and modules it names (refused otherwise)")
    args = parser.parse_intermixed_args(argv)

    def body():
        r = evaluate_checkpoint(args.checkpoint, args.config, args.out, args.samples, args.overrides,
                                args.trust_checkpoint_code)
        print(f"reward {r['reward_before']:.4f} (base) -> {r['reward_after']:.4f} (trained), KL to base "
              f"{r['kl_to_base']:.4f}; wrote {Path(args.out) if args.out else Path(args.checkpoint) / 'eval'}")

    return run_cli(body)
