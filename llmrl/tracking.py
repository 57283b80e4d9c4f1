"""Metrics: a JSONL log (one line per step) and TensorBoard, written by the main rank only."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    """log.jsonl and TensorBoard always; Weights & Biases too when ``report_to`` names it."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None,
                 report_to: list[str] = (), config: dict | None = None, wandb_project: str | None = None,
                 wandb_entity: str | None = None, wandb_run_name: str | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                from llmrl.config import ConfigError

                raise ConfigError("run.report_to names wandb but it is not installed: pip install wandb, or remove "
                                  "it from run.report_to") from None
            self.wandb = wandb.init(**wandb_arguments(run_dir, config, wandb_project, wandb_entity, wandb_run_name))
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after the checkpoint we resume from.
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                purge_step=None if resume_step is None else resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines of steps <= ``step``: a resumed run rewrites the steps after its checkpoint (and drops
        a line a full disk or a kill left half-written)."""
        if not self.path.exists():
            return
        kept = [json.dumps(row) for row in read_log(self.path.parent) if row.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
                 for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for key, value in clean.items():
            if value is not None:
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def log_samples(self, step: int, samples: list[tuple]) -> None:
        """A table of (prompt, completion, reward) in log.jsonl, TensorBoard text and W&B."""
        if not self.enabled or not samples:
            return
        rows = [{"prompt": p, "completion": c, "reward": r} for p, c, r in samples]
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "samples": rows}) + "\n")

        table = "| prompt | completion | reward |\n|---|---|---|\n" + "".join(
            f"| {markdown_cell(r['prompt'])} | {markdown_cell(r['completion'])} | {r['reward']} |\n" for r in rows)
        self.tb.add_text("samples", table, step)
        self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=["prompt", "completion", "reward"],
                                                   data=[[r["prompt"], r["completion"], r["reward"]] for r in rows])},
                           step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_arguments(run_dir: Path, config: dict | None, project: str | None = None, entity: str | None = None,
                    name: str | None = None) -> dict:
    """``wandb.init`` keywords: run.wandb_project, wandb_entity and wandb_run_name where set (else W&B reads
    WANDB_PROJECT and WANDB_ENTITY itself); the files in WANDB_DIR when it is set (W&B reads it when no dir is
    passed), else in the run directory."""
    kwargs = dict(name=name or Path(run_dir).name, config=config, resume="allow")
    if not os.environ.get("WANDB_DIR"):
        kwargs["dir"] = str(run_dir)
    kwargs.update({k: v for k, v in (("project", project), ("entity", entity)) if v is not None})
    return kwargs


def markdown_cell(text) -> str:
    """``text`` safe inside one Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def read_log(run_dir: Path) -> list[dict]:
    """Every line of log.jsonl: metric rows, and sample tables (rows with a "samples" key). A last line cut off
    mid-write (a kill, a full disk) is left out; a damaged line anywhere else is an error naming it."""
    path = Path(run_dir) / "log.jsonl"
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            from llmrl.config import ConfigError

            raise ConfigError(f"{path}: line {i + 1} is not JSON ({line[:60]!r}): remove it") from None
    return rows
