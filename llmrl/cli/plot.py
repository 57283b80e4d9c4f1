"""``llmrl plot RUN_DIR``: PNG curves from a run's log.jsonl (headless matplotlib)."""
from __future__ import annotations

import argparse
from pathlib import Path

PANELS = [  # (title, keys): a panel is drawn when the run logged one of its keys
    ("reward", ["reward/mean", "reward/raw_mean", "reward/normalized_mean", "eval/reward"]),
    ("reward shaping", ["reward/eos_penalty", "reward/eos_penalized", "reward/clipped"]),
    ("KL to the reference", ["objective/kl", "info/kl_ref"]),
    ("KL coefficient", ["objective/kl_coef"]),
    ("entropy", ["objective/entropy"]),
    ("response length (tokens)", ["response/length"]),
    ("clip fraction", ["policy/clipfrac", "value/clipfrac"]),
    ("losses", ["loss/policy", "loss/value", "loss/kl"]),
    ("DPO: loss", ["loss/dpo"]),
    ("DPO: preference accuracy", ["rewards/accuracy"]),
    ("DPO: margin (beta x log-ratio difference)", ["rewards/margin"]),
    ("KTO: loss", ["loss/kto"]),
    ("KTO: beta x log-ratio, desirable and undesirable", ["rewards/chosen", "rewards/rejected"]),
    ("KTO: reference point z0 (KL on mismatched pairs)", ["kl"]),
    ("ILQL: losses", ["loss/q", "loss/v", "loss/cql", "loss/awac"]),
    ("ILQL: Q, V and the advantage Q - V on the logged tokens", ["ilql/q_mean", "ilql/v_mean", "ilql/advantage_mean"]),
    ("seconds per phase", ["time/generate", "time/reward", "time/forward", "time/update", "time/step"]),
    ("episode success rate", ["env/success", "eval/success"]),
    ("turns per episode", ["env/turns", "eval/turns"]),
    ("episodes truncated", ["env/truncated", "eval/truncated"]),
    ("sampler vs trainer: |log-prob diff|", ["sampling/logprob_diff_mean", "sampling/logprob_diff_max"]),
    ("importance weights (train.importance_sampling)", ["sampling/is_weight_mean", "sampling/is_clipped"]),
]

LABELS = {  # what a line is, in its legend, where the key alone does not say (docs/runs.md lists every metric)
    "reward/mean": "reward/mean (shaped: trained on)",
    "reward/raw_mean": "reward/raw_mean (the reward's own)",
    "reward/normalized_mean": "reward/normalized_mean (after reward.normalize)",
    "eval/reward": "eval/reward (held-out)",
    "reward/eos_penalty": "reward/eos_penalty (mean subtracted for no EOS)",
    "reward/eos_penalized": "reward/eos_penalized (share without EOS)",
    "reward/clipped": "reward/clipped (share past reward.clip)",
    "objective/kl": "objective/kl (the algorithm's, as trained with)",
    "info/kl_ref": "info/kl_ref (k3, not in the loss: information)",
}


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes ``figure``'s PNG of the run's log.jsonl (default: RUN_DIR/curves.png); returns its path."""
    import matplotlib.pyplot as plt

    from llmrl.config import ConfigError
    from llmrl.tracking import read_log

    run_dir = Path(run_dir)
    if not (run_dir / "log.jsonl").is_file():
        raise ConfigError(f"{str(run_dir)!r} has no log.jsonl: pass a run directory (run.output_dir)")
    rows = [r for r in read_log(run_dir) if "samples" not in r]
    if not rows:
        raise ConfigError(f"{run_dir / 'log.jsonl'} has no metrics yet")
    algorithm = run_algorithm(run_dir)
    fig = figure(rows, f"{run_dir} ({algorithm})" if algorithm else str(run_dir))
    if fig is None:
        raise ConfigError(f"{run_dir / 'log.jsonl'} holds none of the metrics llmrl plots")
    out = Path(out) if out else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_algorithm(run_dir: Path) -> str | None:
    """The algorithm a run trained with, from its newest checkpoint's config.yaml; None without one."""
    import yaml

    configs = sorted(run_dir.glob("step-*/config.yaml")) + sorted(run_dir.glob("final/config.yaml"))
    for path in reversed(configs):
        try:
            return str(yaml.safe_load(path.read_text()).get("algorithm", "ppo"))  # "ppo": the key's default
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    return None


def figure(rows: list[dict], title: str):
    """The panels of ``PANELS`` that ``rows`` (log.jsonl's) hold a value of, three per row, steps on an integer
    axis; None when they hold none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = [(name, [(key, [(r["step"], r[key]) for r in rows if r.get(key) is not None]) for key in keys])
              for name, keys in PANELS]
    curves = [(name, [(key, points) for key, points in lines if points]) for name, lines in curves]
    curves = [(name, lines) for name, lines in curves if lines]
    if not curves:
        return None
    n_rows = -(-len(curves) // 3)
    fig, axes = plt.subplots(n_rows, 3, figsize=(15, 4 * n_rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for ax, (name, lines) in zip(axes.flat, curves):
        for key, points in lines:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 20 else None, label=LABELS.get(key, key))
        ax.set_title(name)
        ax.set_xlabel("step")
        steps = {x for _, points in lines for x, _ in points}
        if len(steps) == 1:  # one step (an evaluation at the end): a range around it that holds whole steps
            ax.set_xlim(min(steps) - 1, min(steps) + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    from llmrl.cli.console import run_cli

    parser = argparse.ArgumentParser(description="Plot the metrics a run logged (reward, raw and shaped, and each "
                                                 "shaping step; the KL and its coefficient as the algorithm uses "
                                                 "them; entropy, length, clip fraction, losses, DPO's accuracy, "
                                                 "episodes, time per phase) as PNG curves.")
    parser.add_argument("run_dir", help="a run directory holding log.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(f"wrote {plot_run(args.run_dir, args.out)}"))
