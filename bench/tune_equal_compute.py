"""Does tuning pay at equal compute? The tiny recipe started from a deliberately poor learning rate and KL weight,
three ways, each given the same number of training steps in all:

- untuned: one run of TRIALS x STEPS steps with the poor values;
- search: ``llmrl tune`` (TPE, median pruning) of TRIALS trials of STEPS steps each over configs/tune/tiny_space.yaml
  (pruned trials run fewer, so the search uses at most the budget);
- PBT: ``llmrl pbt`` with POPULATION members of TRIALS x STEPS / POPULATION steps each over the same space.

Judged by the held-out evaluation reward (greedy exact match on the recipe's 256 held-out strings). The search's
figure is its best trial's, chosen on that same held-out set, so it is an optimistic one; the "fresh seed" column
trains the chosen config again with another seed and judges it the same way (extra compute, shown apart). PBT's
figure is its best member's (the one a user keeps) and the population's mean.

    python bench/tune_equal_compute.py [--seeds 0 1] [--trials 6] [--steps 40] [--population 4] [--out runs/bench-tune]

Prints a markdown table per seed and the mean over seeds; writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from llmrl_command import llmrl  # bench/llmrl_command.py

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny.yaml"
SPACE = REPO / "configs" / "tune" / "tiny_space.yaml"
POOR = ["train.lr=3.0e-5", "ppo.init_kl_coef=0.5"]  # 30x too low a rate, 25x too strong a KL pull


def steps_run(run_dir: Path) -> int:
    """Training steps a run folder's log.jsonl records (one row per step; evaluation rows carry no policy loss)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return len({row["step"] for row in rows if row.get("step", 0) > 0 and "reward/mean" in row})


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def one_seed(seed: int, args, out: Path) -> dict:
    budget = args.trials * args.steps
    row: dict = {"seed": seed, "budget_steps": budget}
    base = [f"run.seed={seed}", "run.save_every=0", *POOR]

    run = out / f"untuned-seed{seed}"
    wall = llmrl("train", "--config", str(RECIPE), *base, f"train.total_steps={budget}", "run.eval_every=0",
                 f"run.output_dir={run}", "--overwrite", log=out / f"untuned-seed{seed}.log")
    row["untuned"] = {"reward": summary(run)["eval_reward_after"], "steps": steps_run(run), "wall": wall,
                      "before": summary(run)["eval_reward_before"]}

    study = out / f"search-seed{seed}"
    wall = llmrl("tune", "--config", str(RECIPE), "--space", str(SPACE), "--trials", str(args.trials),
                 "--seed", str(seed), "--out", str(study), *base, f"train.total_steps={args.steps}",
                 f"run.eval_every={max(1, args.steps // 4)}", log=out / f"search-seed{seed}.log")
    import optuna

    trials = sorted((study / "trials").iterdir())
    found = optuna.load_study(study_name=None, storage=f"sqlite:///{study / 'study.db'}")
    states = [t.state.name for t in found.trials]
    row["search"] = {"reward": found.best_value, "steps": sum(steps_run(t) for t in trials), "wall": wall,
                     "trials": len(trials), "pruned": states.count("PRUNED"), "best": found.best_params}
    fresh = out / f"search-seed{seed}-fresh"
    llmrl("train", "--config", str(study / "best.yaml"), f"run.seed={seed + 100}", f"run.output_dir={fresh}",
          "run.eval_every=0", "--overwrite", log=out / f"search-seed{seed}-fresh.log")
    row["search"]["fresh_seed_reward"] = summary(fresh)["eval_reward_after"]

    population = out / f"pbt-seed{seed}"
    per_member = budget // args.population
    # --synch: every member reports at each interval and a copied checkpoint is of that same step, so each member
    # trains exactly its share of the budget (asynchronous PBT may train a few steps again after an exploit)
    wall = llmrl("pbt", "--config", str(RECIPE), "--space", str(SPACE), "--population", str(args.population),
                 "--interval", str(max(1, per_member // 6)), "--seed", str(seed), "--out", str(population), "--synch",
                 *base, f"train.total_steps={per_member}", log=out / f"pbt-seed{seed}.log")
    members = sorted((population / "members").iterdir())
    finals = [summary(m)["eval_reward_after"] for m in members if (m / "summary.json").exists()]
    exploits = len(list((population / "replaced").glob("*/*"))) if (population / "replaced").is_dir() else 0
    row["pbt"] = {"reward": max(finals), "mean": statistics.mean(finals), "wall": wall, "exploits": exploits,
                  "steps": args.population * per_member, "members": len(members)}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| seed | budget (steps) | untuned | search: best trial | search: its config, fresh seed | "
             "PBT: best member | PBT: population mean | steps trained (untuned / search / PBT) | wall s (untuned / search "
             "/ PBT) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['budget_steps']} | {r['untuned']['reward']:.3f} | {r['search']['reward']:.3f}"
                     f" | {r['search']['fresh_seed_reward']:.3f} | {r['pbt']['reward']:.3f} | {r['pbt']['mean']:.3f} | "
                     f"{r['untuned']['steps']} / {r['search']['steps']} / {r['pbt']['steps']} | "
                     f"{r['untuned']['wall']:.0f} / {r['search']['wall']:.0f} / {r['pbt']['wall']:.0f} |")
    if len(rows) > 1:
        mean = lambda f: statistics.mean(f(r) for r in rows)  # noqa: E731
        lines.append(f"| mean | | {mean(lambda r: r['untuned']['reward']):.3f} | "
                     f"{mean(lambda r: r['search']['reward']):.3f} | {mean(lambda r: r['search']['fresh_seed_reward']):.3f}"
                     f" | {mean(lambda r: r['pbt']['reward']):.3f} | {mean(lambda r: r['pbt']['mean']):.3f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40, help="steps per trial")
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-tune" / time.strftime("%Y%m%d-%H%M%S"),
                        help="a new folder (default: runs/bench-tune/DATE-TIME)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(seed, args, args.out))
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
        print(table(rows), flush=True)
    print(f"\nThe poor start: {' '.join(POOR)}; held-out reward before training "
          f"{rows[0]['untuned']['before']:.3f}. Results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
