"""The tools around training: plot, eval, the config reference, sample tables and tracker options."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_trainer, tiny_config
from llmrl.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_plot_writes_a_non_blank_png(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward/mean": s / 10, "objective/kl": 0.1 * s, "objective/entropy": 2 - s / 10,
             "response/length": 5 + s % 3, "policy/clipfrac": 0.01 * s, "time/generate": 0.2,
             "time/update": 0.3, "env/success": s / 20, "env/turns": 1 + s % 2,
             "sampling/logprob_diff_mean": 0.03, "sampling/logprob_diff_max": 0.3} for s in range(1, 11)]
    rows.insert(5, {"step": 5, "samples": [{"prompt": "a>", "completion": "a", "reward": 1.0}]})
    rows.append({"step": 10, "eval/reward": 0.8})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "llmrl", "plot", str(run)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    image = Image.open(run / "curves.png").convert("RGB")
    assert image.size == (1500, 1200)
    colours = image.getcolors(maxcolors=1_000_000)
    assert len(colours) > 50  # curves, text and axes, not a blank canvas
    white = max(count for count, rgb in colours if rgb == (255, 255, 255))
    assert white < 0.97 * image.size[0] * image.size[1]
    elsewhere = tmp_path / "plots" / "run.png"  # a folder that does not exist yet
    out = subprocess.run([sys.executable, "-m", "llmrl", "plot", str(run), "--out", str(elsewhere)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and Image.open(elsewhere).size == (1500, 1200), out.stderr[-2000:]


def test_plot_draws_the_panels_the_run_logged_on_integer_steps():
    """A 3-step DPO run: its loss, accuracy and margin and the held-out reward are drawn, nothing of PPO's, no
    empty panel; a 3-step axis shows whole steps only."""
    from llmrl.cli.plot import figure

    rows = [{"step": s, "loss/dpo": 0.69 - s / 10, "rewards/accuracy": 0.5 + s / 10, "rewards/margin": s / 5,
             "time/step": 0.4} for s in (1, 2, 3)] + [{"step": 3, "eval/reward": 0.5}]
    fig = figure(rows, "dpo run")
    drawn = [ax for ax in fig.axes if ax.axison]
    titles = [ax.get_title() for ax in drawn]
    assert titles == ["reward", "DPO: loss",
                      "DPO: preference accuracy", "DPO: margin (beta x log-ratio difference)", "seconds per phase"]
    assert len(fig.axes) == 6  # two rows of three, the last one blank
    for ax in drawn:
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    kto = figure([{"step": s, "loss/kto": 0.5, "kl": 0.1, "rewards/chosen": 0.2, "rewards/rejected": -0.1,
                   "rewards/margins": 0.3} for s in (1, 2)], "kto run")
    assert [ax.get_title() for ax in kto.axes if ax.axison] == [
        "KTO: loss", "KTO: beta x log-ratio, desirable and undesirable",
        "KTO: reference point z0 (KL on mismatched pairs)"]
    ilql = figure([{"step": s, "loss/ilql": 3.0, "loss/q": 0.2, "loss/v": 0.01, "loss/cql": 2.3, "loss/awac": 0.9,
                    "ilql/q_mean": 0.1, "ilql/v_mean": 0.08, "ilql/advantage_mean": 0.02, "ilql/actions": 40}
                   for s in (1, 2)], "ilql run")
    assert [ax.get_title() for ax in ilql.axes if ax.axison] == [
        "ILQL: losses", "ILQL: Q, V and the advantage Q - V on the logged tokens"]
    assert [line.get_label() for line in ilql.axes[1].get_lines()] == ["ilql/q_mean", "ilql/v_mean",
                                                                      "ilql/advantage_mean"]
    online = figure([{"step": 1, "reward/mean": -0.4, "reward/raw_mean": 0.2, "objective/kl": 0.1}], "online")
    lines = [line.get_label() for line in online.axes[0].get_lines()]
    assert lines == ["reward/mean (shaped: trained on)", "reward/raw_mean (the reward's own)"]  # side by side
    assert figure([{"step": 1, "something/else": 1.0}], "none") is None


def test_plot_of_a_folder_without_a_log_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmrl", "plot", str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2 and "has no log.jsonl: pass a run directory" in out.stderr


def test_eval_reports_reward_before_after_and_kl_to_base(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", "train.lr=1e-2"))
    trainer.train_step()
    trainer.train_step()
    checkpoint = trainer.save_checkpoint(tmp_path / "run" / "final")
    out = subprocess.run([sys.executable, "-m", "llmrl", "eval", "--checkpoint", str(checkpoint), "--samples", "3"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((checkpoint / "eval" / "eval.json").read_text())
    assert result["prompts"] == 8 and len(result["samples"]) == 3
    assert result["kl_to_base"] > 0  # the adapter moved the policy away from the base
    assert result["reward_after"] == pytest.approx(trainer.evaluate()["eval/reward"])
    with trainer.policy.reference():
        assert result["reward_before"] == pytest.approx(trainer.evaluate()["eval/reward"])
    table = (checkpoint / "eval" / "eval.md").read_text()
    assert "| prompt | before | reward | after | reward |" in table and table.count("\n| ") >= 4


def test_config_reference_is_up_to_date():
    from llmrl.cli.docs import OUT, reference

    assert OUT.read_text() == reference(), "docs/config.md is stale: run python -m llmrl.cli.docs"


def test_wandb_requested_but_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    from llmrl.tracking import MetricsLogger

    with pytest.raises(ConfigError, match="run.report_to names wandb but it is not installed: pip install wandb"):
        MetricsLogger(tmp_path, report_to=["wandb"])


def test_every_subcommand_explains_its_options():
    for name in ("train", "sft", "export", "train-reward", "serve-reward", "eval", "plot"):
        out = subprocess.run([sys.executable, "-m", "llmrl", name, "--help"], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        assert out.returncode == 0 and "usage: llmrl" in out.stdout and "options:" in out.stdout, name


def test_first_line_quotes_one_line_of_another_librarys_error():
    from llmrl.errors import first_line

    assert first_line(OSError("No space left on device\nTraceback: ...")) == "No space left on device"
    assert first_line(KeyError()) == "KeyError"  # no message: its type
    assert first_line(ValueError("  \n  ")) == "ValueError"
    assert first_line(RuntimeError("x" * 300), 160) == "x" * 160
