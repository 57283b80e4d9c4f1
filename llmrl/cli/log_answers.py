"""``llmrl log-answers --config C.yaml --per-prompt K --out DIR``: a model's own sampled answers to the training
prompts, scored by the recipe's reward, as offline-RL data (``llmrl.trainers.logs.log_answers``)."""
from __future__ import annotations

import json
from pathlib import Path

from llmrl.trainers.logs import DEFAULT_THRESHOLD, log_answers


def main(argv: list[str] | None = None) -> int:
    from llmrl.cli.console import config_parser, run_cli

    parser = config_parser(
        "Sample the recipe's base model's own answers to its training prompts (never the held-out ones), score them "
        "with its reward and write rewarded.jsonl (ILQL), labelled.jsonl (KTO), positives.jsonl (filtered SFT), "
        "pairs.jsonl (DPO) and summary.json into --out.", "YAML recipe, e.g. configs/smollm2.yaml")
    parser.add_argument("--per-prompt", type=int, required=True, help="answers sampled per prompt (e.g. 4)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="log this many training prompts, drawn at random with run.seed (default: all)")
    parser.add_argument("--out", required=True, help="folder to write the files into")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"an answer whose reward is at least this is positive (KTO's true, SFT's positives, "
                             f"DPO's chosen); default {DEFAULT_THRESHOLD}: a rule's pass (1) above, a fail (0) below")
    parser.add_argument("--overwrite", action="store_true", help="replace the files already in --out")
    args = parser.parse_intermixed_args(argv)

    def body():
        from llmrl.config import load_config

        cfg = load_config(args.config, args.overrides)
        build_missing_base(cfg)
        s = log_answers(cfg, args.out, args.per_prompt, args.prompts, args.threshold, args.overwrite)
        print(json.dumps(s, indent=2))
        print(f"logged {s['written']} answers to {s['prompts']} prompts: {s['positives']} positive "
              f"({s['positive_share']:.1%}), {s['pairs']} pairs, base mean reward {s['mean_raw_reward']:.4f}; wrote "
              f"{Path(args.out)} in {s['wall_seconds']:.0f}s")

    return run_cli(body)


def build_missing_base(cfg) -> None:
    """The tiny recipe's base is built by its warm start on first use, as ``llmrl train`` builds it."""
    name = cfg.model.name_or_path
    if cfg.warm_start is not None and not name.startswith("pkg:") and not name.endswith(".gguf") \
            and not Path(name).exists():
        from llmrl.demo.warm_start import run_warm_start

        run_warm_start(cfg, progress=cfg.run.progress)
