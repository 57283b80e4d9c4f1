"""A run's folder (``run.output_dir``): what may be there, what ``--overwrite`` may delete, what ``--resume`` may
change, and the leftovers of a run that was killed or ran out of disk.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

from llmrl.config import Config, ConfigError, to_dict, upgrade_saved_config
from llmrl.distributed.checkpoint import COMPLETE_MARK, latest_checkpoint, step_checkpoints

# What a run writes in run.output_dir, and inside each of its checkpoints.
RUN_ENTRY = re.compile(r"^(log\.jsonl|log\.tmp|summary\.json|tensorboard|wandb|final|curves\.png|step-\d+|"
                       r"\.(tmp|old)-.+)$")
CHECKPOINT_ENTRY = re.compile(rf"^(adapter|value_head\.safetensors|{re.escape(COMPLETE_MARK)}|config\.yaml|tokenizer|"
                              r"base_fingerprint\.json|rng_rank\d+\.pt|deepspeed|eval)$")
CHECKPOINT_FOLDER = re.compile(r"^(final|step-\d+|\.(tmp|old)-.+)$")
EVAL_ENTRY = re.compile(r"^eval\.(json|md)$")
LEFTOVER = re.compile(r"^\.(tmp|old)-")

# Settings a resumed run may change (and which it applies); every other difference from the checkpoint's
# config.yaml is refused by name. Sizes, the algorithm, the model, LoRA, data and rewards fix what the saved
# state means; these only steer how the rest of the run proceeds or reports.
RESUMABLE = {
    "train.total_steps": "train longer (or shorter); a linear or cosine schedule stretches to the new end",
    "train.lr": "the learning rate from now on (e.g. lower, after a divergence)",
    "reward.timeout": "how long the reward may take",
    "run.progress": "", "run.eval_every": "", "run.save_every": "", "run.keep_last": "", "run.log_samples": "",
    "run.report_to": "", "run.threads": "", "run.device": "", "run.output_dir": "the run folder moved",
}
RESUMABLE_COMPONENT_KEYS = ("timeout", "retries", "batch_size")


def foreign_entries(run_dir: Path) -> list[str]:
    """What in ``run_dir`` llmrl did not write: checked at the top and one level inside each checkpoint (and its
    eval/), so that ``--overwrite`` deletes a run's own files only. Links are never followed, so always foreign."""
    found = []
    for entry in sorted(run_dir.iterdir()):
        if entry.is_symlink() or not RUN_ENTRY.match(entry.name):
            found.append(entry.name)
        elif entry.is_dir() and CHECKPOINT_FOLDER.match(entry.name):
            for inner in sorted(entry.iterdir()):
                if inner.is_symlink() or not CHECKPOINT_ENTRY.match(inner.name):
                    found.append(f"{entry.name}/{inner.name}")
                elif inner.name == "eval" and inner.is_dir():
                    found += [f"{entry.name}/eval/{e.name}" for e in sorted(inner.iterdir())
                              if e.is_symlink() or not EVAL_ENTRY.match(e.name)]
        elif entry.name == "tensorboard" and entry.is_dir():
            found += [f"tensorboard/{e.name}" for e in sorted(entry.iterdir())
                      if e.is_symlink() or not e.name.startswith("events.out.tfevents.")]
    return found


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Returns the checkpoint to resume from (or None); refuses to clobber a run that holds checkpoints, and
    folders that are not a run's. Reads only, so every rank can call it and reach the same verdict."""
    if run_dir.is_symlink():
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} is a symbolic link: llmrl writes (and --overwrite "
                          f"deletes) only real folders; point run.output_dir at {str(run_dir.resolve())!r} itself")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} is a file, not a folder: choose another run.output_dir")
    if overwrite:
        foreign = foreign_entries(run_dir) if run_dir.is_dir() else []
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--overwrite: run.output_dir = {str(run_dir)!r} also holds {shown}, which llmrl "
                              f"did not write there: --overwrite replaces a run folder only; choose another "
                              f"run.output_dir or move those away")
        return None
    found = step_checkpoints(run_dir)
    if resume:
        if not found:
            raise ConfigError(f"--resume: run.output_dir = {str(run_dir)!r} holds no complete checkpoint; "
                              f"run without --resume to start")
        return latest_checkpoint(run_dir)
    if found or (run_dir / "final").exists():
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} already holds a run: pass --resume to continue it, "
                          f"--overwrite to replace it, or choose another run.output_dir")
    return None


def make_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create (or, with ``overwrite``, empty) the folder; clear what a killed run left half-written."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_leftovers(run_dir)


def clear_leftovers(run_dir: Path) -> None:
    """Temporary checkpoint folders of a run killed (or out of disk) mid-write are removed: on a full disk they
    would keep it full. A ``.old-NAME-PID`` folder is the previous NAME from an interrupted replacement: it is put
    back when NAME is missing, else removed."""
    for entry in run_dir.iterdir():
        if not LEFTOVER.match(entry.name) or entry.is_symlink():
            continue
        if entry.name.startswith(".old-"):
            name = entry.name[len(".old-"):].rsplit("-", 1)[0]
            if not (run_dir / name).exists() and (entry / COMPLETE_MARK).is_file():
                os.rename(entry, run_dir / name)
                continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _flat(data, prefix: str = "") -> dict:
    out = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            out.update(_flat(value, f"{prefix[:-1]}[{i}]."))
    else:
        out[prefix[:-1]] = data
    return out


def resume_changes(checkpoint: Path, cfg: Config) -> dict[str, tuple]:
    """{dotted key: (checkpoint's value, this run's)} for the settings a resume may change; a ConfigError naming
    every other setting that differs from the checkpoint's config.yaml."""
    try:
        saved = yaml.safe_load((Path(checkpoint) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"checkpoint {checkpoint}: config.yaml cannot be read ({str(e).splitlines()[0]}): move this "
                          f"folder away to resume from the checkpoint before it") from None
    old, new = _flat(upgrade_saved_config(saved) if isinstance(saved, dict) else saved), _flat(to_dict(cfg))
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}

    def allowed(key: str) -> bool:
        component = re.match(r"^reward\.components\[\d+\]\.(\w+)$", key)
        return key in RESUMABLE or bool(component and component.group(1) in RESUMABLE_COMPONENT_KEYS)

    refused = {k: v for k, v in changed.items() if not allowed(k)}
    if refused:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(f"--resume: {shown}{more} differ from the checkpoint's settings ({checkpoint}/config.yaml): "
                          f"a resumed run keeps them; undo the change, or start a new run in another run.output_dir. "
                          f"A resume may change only {', '.join(RESUMABLE)} and reward timeouts, retries and batch "
                          f"sizes")
    return changed
