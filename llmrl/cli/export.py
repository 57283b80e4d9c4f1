"""``llmrl export`` / ``python launch/export.py --checkpoint RUN/final --out FOLDER``."""
from __future__ import annotations

import argparse

from llmrl.cli.console import run_cli
from llmrl.exporter import CHECKSUMS, DTYPES, TOLERANCE, export, holds_full_model, verify_export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export an llmrl checkpoint as a plain transformers model.")
    parser.add_argument("--checkpoint", help="a run's final/ or step-N/ folder")
    parser.add_argument("--out", help="output folder (must be empty or absent, or an earlier export with --overwrite;"
                                      " never the checkpoint's run folder)")
    parser.add_argument("--verify", metavar="EXPORT", default=None,
                        help=f"check an earlier export's files against its {CHECKSUMS} instead of exporting")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--adapter-only", action="store_true", help="save the peft adapter instead of merging")
    parser.add_argument("--base", default=None, help="base model location, if it moved since training")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"max logit difference allowed, measured in fp32 for every --dtype (default "
                             f"{TOLERANCE:g})")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an earlier export at --out (one whose files its {CHECKSUMS} lists)")
    parser.add_argument("--distill-steps", type=int, default=None, metavar="N",
                        help="an ILQL checkpoint: first train the adapter N steps to imitate the ILQL policy (logits "
                             "+ beta * (Q - V)) on the logged prompts, then export it; 0 exports the model without the "
                             "heads (the policy at beta 0)")
    parser.add_argument("--distill-lr", type=float, default=1e-3, help="learning rate of --distill-steps")
    parser.add_argument("--distill-batch-size", type=int, default=16, help="sequences per --distill-steps step")
    parser.add_argument("--trust-checkpoint-code", action="store_true",
                        help="let the checkpoint's config.yaml run model code from the hub (model.trust_remote_code)")
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.checkpoint or args.out:
            parser.error("--verify checks an earlier export: pass it without --checkpoint and --out")

        def check():
            print(f"verified {args.verify}: all {verify_export(args.verify)} files match {CHECKSUMS}")

        return run_cli(check)
    if not args.checkpoint or not args.out:
        parser.error("--checkpoint and --out are required (or --verify EXPORT)")
    if args.distill_steps is not None and args.distill_steps < 0:
        parser.error(f"--distill-steps {args.distill_steps} must be >= 0 (0: export without the ILQL heads)")

    def body():
        if args.distill_steps:
            import torch

            from llmrl.trainers.ilql_distill import export_distilled

            report, diff = export_distilled(
                args.checkpoint, args.out, args.distill_steps, args.distill_lr, args.distill_batch_size, args.dtype,
                args.adapter_only, args.overwrite, args.base, args.tolerance,
                "cuda" if torch.cuda.is_available() else "cpu", args.trust_checkpoint_code,
                say=lambda line: print(line, flush=True))
            print(f"distilled the ILQL policy: KL per token on held-out prompts {report.kl_before:.4g} -> "
                  f"{report.kl_after:.4g}, greedy accuracy {report.accuracy_before:.3f} -> {report.accuracy_after:.3f}"
                  f", equal greedy completions {report.agreement_before:.3f} -> {report.agreement_after:.3f}")
        else:
            diff = export(args.checkpoint, args.out, args.dtype, args.adapter_only, args.overwrite, args.base,
                          args.tolerance, args.trust_checkpoint_code, drop_ilql_heads=args.distill_steps == 0)
        if holds_full_model(args.checkpoint):
            return  # all weights trained (lora: null): export said what it wrote; there was nothing to merge
        what = "adapter" if args.adapter_only else f"merged model ({args.dtype})"
        rounding = ("" if args.adapter_only or args.dtype == "fp32" else
                    f" (the rounding to {args.dtype}; README.md there says what was checked)")
        print(f"exported {what} to {args.out}; max logit difference to base + adapter: {diff:.3g}{rounding}")

    return run_cli(body)

