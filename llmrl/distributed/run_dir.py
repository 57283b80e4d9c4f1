"""A run's folder (``run.output_dir``): who may write it (one run at a time, under a lock), what may be there, what
``--overwrite`` may delete, what ``--resume`` may change, and the leftovers of a run that was killed or ran out of
disk.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import yaml

from llmrl.config import SCHEDULABLE, Config, ConfigError, to_dict, upgrade_saved_config
from llmrl.distributed.checkpoint import (COMPLETE_MARK, OWNED_MARK, STEP_DIR, is_own_temporary, latest_checkpoint,
                                          step_checkpoints)
from llmrl.distributed.lock import LOCK_FILE, RunLock, lock_run_dir

# Written by llmrl into every run folder it makes: a non-empty folder without it (or a checkpoint of an older
# llmrl's run) is not a run folder, and llmrl neither writes into it nor deletes anything there.
RUN_MARK = ".llmrl-run"
# What a run writes in run.output_dir, and inside each of its checkpoints. Temporary folders (.tmp-*, .old-*)
# are llmrl's only when they hold its mark (checkpoint.OWNED_MARK), whatever their name.
# (llmrl pbt adds a member's schedule.yaml and replay.yaml.)
RUN_ENTRY = re.compile(rf"^(log\.jsonl|log\.tmp|summary\.json|tensorboard|wandb|final|curves\.png|step-\d+|base|"
                       rf"schedule\.yaml|replay\.yaml|"
                       rf"{re.escape(RUN_MARK)}|{re.escape(LOCK_FILE)})$")
CHECKPOINT_ENTRY = re.compile(rf"^(adapter|model|value_head\.safetensors|ilql_heads\.safetensors|"
                              rf"{re.escape(COMPLETE_MARK)}|config\.yaml|tokenizer|"
                              rf"base_fingerprint\.json|rng_rank\d+\.pt|deepspeed|eval|{re.escape(OWNED_MARK)})$")
CHECKPOINT_FOLDER = re.compile(r"^(final|step-\d+)$")
EVAL_ENTRY = re.compile(r"^eval\.(json|md)$")
LEFTOVER = re.compile(r"^\.(tmp|old)-")

# Settings a resumed run may change (and which it applies); every other difference from the checkpoint's
# config.yaml is refused by name. Sizes, the algorithm, the model, LoRA, data and rewards fix what the saved
# state means; these only steer how the rest of the run proceeds or reports.
RESUMABLE = {
    "train.total_steps": "train longer (or shorter); a linear or cosine schedule stretches to the new end",
    "train.lr": "the learning rate from now on (e.g. lower, after a divergence)",
    **{k: v for k, v in SCHEDULABLE.items() if k != "train.lr"},  # applied from the resumed step on, as a schedule's
    "reward.timeout": "how long the reward may take",
    "run.progress": "", "run.eval_every": "", "run.save_every": "", "run.keep_last": "", "run.log_samples": "",
    "run.report_to": "", "run.threads": "", "run.device": "", "run.output_dir": "the run folder moved",
    "run.stop_grace_seconds": "",  # also: checkpoints written before the setting existed still resume
    "run.wandb_project": "", "run.wandb_entity": "", "run.wandb_run_name": "",
}
RESUMABLE_COMPONENT_KEYS = ("timeout", "retries", "batch_size")


def foreign_entries(run_dir: Path) -> list[str]:
    """What in ``run_dir`` llmrl did not write: checked at the top and one level inside each checkpoint (and its
    eval/), so that ``--overwrite`` deletes a run's own files only. Links are never followed, so always foreign;
    a ``.tmp-*``/``.old-*`` entry is llmrl's only when it is a folder holding llmrl's mark."""
    found = []
    for entry in sorted(run_dir.iterdir()):
        if entry.is_symlink():
            found.append(entry.name)
        elif LEFTOVER.match(entry.name):
            if not is_own_temporary(entry):
                found.append(entry.name)
        elif not RUN_ENTRY.match(entry.name):
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


def is_run_folder(run_dir: Path) -> bool:
    """Whether llmrl made ``run_dir`` for a run: it holds llmrl's mark, or (a run of an llmrl from before the mark)
    a step-N or final checkpoint folder."""
    if (run_dir / RUN_MARK).is_file() and not (run_dir / RUN_MARK).is_symlink():
        return True
    return any(e.is_dir() and not e.is_symlink() and (STEP_DIR.match(e.name) or e.name == "final")
               for e in run_dir.iterdir())


def shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def forbidden_place(run_dir: Path) -> str | None:
    """Why ``run_dir`` can never be a run folder (the root, the home folder, llmrl's own source tree), or None."""
    import llmrl

    where = Path(os.path.abspath(run_dir)).resolve()
    if where == Path(where.anchor):
        return "the root folder"
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home folder known
        home = None
    if home is not None and (where == home or where in home.parents):
        return "your home folder" if where == home else f"a folder that holds your home folder {str(home)!r}"
    package = Path(llmrl.__file__).resolve().parent
    if where == package or where in package.parents or package in where.parents:
        return f"llmrl's own source tree (the package {str(package)!r}, a folder inside it or one that holds it)"
    return None


def check_run_path(run_dir: Path) -> None:
    """What is wrong with ``run_dir`` as a path, before anything is created or locked there."""
    if run_dir.is_symlink():
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} is a symbolic link: llmrl writes (and --overwrite "
                          f"deletes) only real folders; point run.output_dir at {str(run_dir.resolve())!r} itself")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} is a file, not a folder: choose another run.output_dir")
    place = forbidden_place(run_dir)
    if place:
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} is {place}: a run needs a folder of its own (which "
                          f"--overwrite may empty); choose a new one, e.g. runs/NAME")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Returns the checkpoint to resume from (or None); refuses to clobber a run that holds checkpoints, and
    folders that are not a run's. Reads only, so every rank can call it and reach the same verdict."""
    check_run_path(run_dir)
    flag = "--overwrite: " if overwrite else ""
    entries = sorted(e.name for e in run_dir.iterdir() if e.name != LOCK_FILE or e.is_symlink()) \
        if run_dir.is_dir() else []
    if entries and not is_run_folder(run_dir):
        deletes = ", and --overwrite deletes only what a run wrote" if overwrite else ""
        raise ConfigError(f"{flag}run.output_dir = {str(run_dir)!r} holds {shown(entries)}, but no llmrl run made "
                          f"this folder (it has no {RUN_MARK} and no checkpoint): a run starts only in an empty "
                          f"folder or its own run folder{deletes}; choose another run.output_dir or move those away")
    foreign = foreign_entries(run_dir) if entries else []
    if foreign and overwrite:
        raise ConfigError(f"--overwrite: run.output_dir = {str(run_dir)!r} also holds {shown(foreign)}, which llmrl "
                          f"did not write there: --overwrite replaces a run folder only; choose another "
                          f"run.output_dir or move those away")
    if foreign:
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} also holds {shown(foreign)}, which llmrl did not write "
                          f"there: a run folder holds only what its run writes (nothing there is deleted); choose "
                          f"another run.output_dir or move those away")
    if overwrite:
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


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, strategy) -> tuple[Path | None, RunLock | None]:
    """(the checkpoint to resume from or None, the run folder's lock). The main rank locks the folder before it
    is checked, so that a second run, or --resume / --overwrite of a live run, is refused by the lock instead of
    reading (or deleting) a folder being written; the other DeepSpeed ranks are the same run and only check.
    Keep the returned lock referenced for the whole run: it is released when dropped or when the process ends."""
    import torch

    run_dir = Path(run_dir)
    check_run_path(run_dir)
    lock, refused = None, None
    if strategy.is_main:
        try:
            lock = lock_run_dir(run_dir)
        except ConfigError as e:
            refused = e
    if strategy.world_size > 1:  # every rank stops when the main rank could not lock the folder
        failed = strategy.all_reduce_sum(torch.tensor(float(refused is not None), device=strategy.device)).item()
        if failed and refused is None:
            raise ConfigError(f"run.output_dir = {str(run_dir)!r} could not be locked by the main rank: its message "
                              f"says why")
    if refused is not None:
        raise refused
    try:
        return check_run_dir(run_dir, resume, overwrite), lock
    except BaseException:
        if lock is not None:
            lock.abandon()  # a refused run leaves the folder as it found it
        raise


def make_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create (or, with ``overwrite``, empty of the previous run's files) the folder, mark it as a run folder and
    clear what a killed run left half-written. The lock file of this (live) run stays."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        foreign = set(foreign_entries(run_dir))  # none: check_run_dir refused them; never deleted all the same
        for entry in run_dir.iterdir():
            if entry.name == LOCK_FILE or entry.name in foreign:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (run_dir / RUN_MARK).write_text("a run folder made by llmrl: its checkpoints, logs and summary\n")
    clear_leftovers(run_dir)


def clear_leftovers(run_dir: Path) -> None:
    """Temporary checkpoint folders of a run killed (or out of disk) mid-write are removed: on a full disk they
    would keep it full. Only folders holding llmrl's mark count (a ``.tmp-mywork`` of the user's is never touched).
    A ``.old-NAME-PID`` folder is the previous NAME from an interrupted replacement: it is put back when NAME is
    missing, else removed."""
    for entry in run_dir.iterdir():
        if not LEFTOVER.match(entry.name) or not is_own_temporary(entry):
            continue
        if entry.name.startswith(".old-"):
            name = entry.name[len(".old-"):].rsplit("-", 1)[0]
            if not (run_dir / name).exists() and (entry / COMPLETE_MARK).is_file():
                os.rename(entry, run_dir / name)
                (run_dir / name / OWNED_MARK).unlink(missing_ok=True)
                continue
        shutil.rmtree(entry, ignore_errors=True)


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


def _default_zero_stage(cfg: Config) -> int:
    """The stage a null deepspeed.zero_stage stands for: deepspeed.config_file's (the same file on resume), else 2."""
    from llmrl.distributed.strategy import check_config_file

    try:
        stage = check_config_file(dataclasses.replace(cfg.deepspeed, zero_stage=None))
    except ConfigError:  # a file that is gone or bad: make_strategy says so under DeepSpeed; unused otherwise
        stage = None
    return 2 if stage is None else stage


def resume_changes(checkpoint: Path, cfg: Config) -> dict[str, tuple]:
    """{dotted key: (checkpoint's value, this run's)} for the settings a resume may change; a ConfigError naming
    every other setting that differs from the checkpoint's config.yaml."""
    try:
        saved = yaml.safe_load((Path(checkpoint) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"checkpoint {checkpoint}: config.yaml cannot be read ({str(e).splitlines()[0]}): move this "
                          f"folder away to resume from the checkpoint before it") from None
    old, new = _flat(upgrade_saved_config(saved) if isinstance(saved, dict) else saved), _flat(to_dict(cfg))
    # deepspeed.zero_stage null means "the config_file's stage, else 2" (the default now; it was 2): a run is
    # compared by the stage it uses, so a checkpoint that wrote 2 resumes with the key left out, and back
    for flat in (old, new):
        if "deepspeed.zero_stage" in flat and flat["deepspeed.zero_stage"] is None:
            flat["deepspeed.zero_stage"] = _default_zero_stage(cfg)
    # A setting added to llmrl after the checkpoint was written is absent from its config.yaml: the run ran as its
    # default does, so the default is no change (and any other value is).
    defaults = _flat(to_dict(Config()))
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
               and not (k not in old and k in defaults and new.get(k) == defaults[k])}

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
