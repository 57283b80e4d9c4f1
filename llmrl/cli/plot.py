"""``llmrl plot RUN_DIR``: PNG curves from a run's log.jsonl (headless matplotlib)."""
from __future__ import annotations

import argparse
from pathlib import Path

PANELS = [
    ("reward", ["reward/mean", "eval/reward"]),
    ("KL to the reference", ["objective/kl"]),
    ("entropy", ["objective/entropy"]),
    ("response length (tokens)", ["response/length"]),
    ("clip fraction", ["policy/clipfrac", "value/clipfrac"]),
    ("seconds per phase", ["time/generate", "time/reward", "time/forward", "time/update"]),
    ("episode success rate (env runs)", ["env/success", "eval/success"]),
    ("turns per episode (env runs)", ["env/turns", "eval/turns"]),
    ("episodes truncated (env runs)", ["env/truncated", "eval/truncated"]),
    ("sampler vs trainer: |log-prob diff|", ["sampling/logprob_diff_mean", "sampling/logprob_diff_max"]),
    ("importance weights (train.importance_sampling)", ["sampling/is_weight_mean", "sampling/is_clipped"]),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmrl.config import ConfigError
    from llmrl.tracking import read_log

    run_dir = Path(run_dir)
    if not (run_dir / "log.jsonl").is_file():
        raise ConfigError(f"{str(run_dir)!r} has no log.jsonl: pass a run directory (run.output_dir)")
    rows = [r for r in read_log(run_dir) if "samples" not in r]
    if not rows:
        raise ConfigError(f"{run_dir / 'log.jsonl'} has no metrics yet")
    rows_of_panels = -(-len(PANELS) // 3)
    fig, axes = plt.subplots(rows_of_panels, 3, figsize=(15, 4 * rows_of_panels))
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes.flat, PANELS):
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 20 else None, label=key)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from llmrl.cli.console import run_cli

    parser = argparse.ArgumentParser(description="Plot a run's metrics (reward, KL, entropy, length, clipfrac, "
                                                 "time per phase) as PNG curves.")
    parser.add_argument("run_dir", help="a run directory holding log.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(f"wrote {plot_run(args.run_dir, args.out)}"))
