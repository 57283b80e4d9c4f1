"""Atomic checkpoints: everything is written to a temporary folder that is renamed into place at the end,
so a run killed at any moment leaves either the previous checkpoints or a complete new one, never half of one.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from llmrl.config import CHECKPOINT_MARK

STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE_MARK = CHECKPOINT_MARK  # a checkpoint is complete once this is in it (load_config knows it too)
# Inside every temporary folder llmrl makes (``.tmp-*``, ``.old-*``): the proof that it may clear it.
OWNED_MARK = ".llmrl-temp"


def begin_checkpoint(tmp: Path) -> Path:
    """An empty temporary folder to write a checkpoint into, marked as llmrl's (one left by a killed run is
    discarded; a folder of that name without the mark is not llmrl's and is left alone)."""
    tmp = Path(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if is_own_temporary(tmp):
        shutil.rmtree(tmp)
    elif tmp.exists() or tmp.is_symlink():
        raise FileExistsError(errno.EEXIST, f"exists and was not made by llmrl (no {OWNED_MARK} inside): move it "
                                            f"away", str(tmp))
    tmp.mkdir()
    mark_own(tmp)
    return tmp


def mark_own(folder: Path) -> None:
    """Mark ``folder`` as a temporary folder llmrl made: only such folders are ever cleared as leftovers."""
    (Path(folder) / OWNED_MARK).write_text(f"made by llmrl (pid {os.getpid()}); removed when complete\n")


def is_own_temporary(folder: Path) -> bool:
    """Whether ``folder`` is a real folder holding llmrl's mark (a link or a folder without it is someone else's)."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and (folder / OWNED_MARK).is_file() \
        and not (folder / OWNED_MARK).is_symlink()


def commit_checkpoint(tmp: Path, target: Path) -> Path:
    """Flush ``tmp`` to disk and rename it to ``target``, replacing an older ``target``. The replaced folder is
    marked before it is renamed aside (``.old-NAME-PID``), so that a run killed right then can put it back."""
    tmp, target = Path(tmp), Path(target)
    _fsync_tree(tmp)
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        mark_own(target)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    (target / OWNED_MARK).unlink(missing_ok=True)  # a complete folder is no longer temporary
    _fsync_dir(target.parent)
    return target


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target`` (replacing an older ``target``)."""
    target = Path(target)
    tmp = begin_checkpoint(target.parent / f".tmp-{target.name}-{os.getpid()}")
    try:
        write(tmp)
        return commit_checkpoint(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a small file through a temporary (marked) folder beside it, so readers never see half of it and a
    killed run leaves only a leftover that is provably llmrl's."""
    path = Path(path)
    tmp = begin_checkpoint(path.with_name(f".tmp-{path.name}-{os.getpid()}"))
    try:
        with open(tmp / path.name, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``step-N`` checkpoints in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for d in run_dir.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / COMPLETE_MARK).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for _, path in step_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def load_state_file(path: Path, allowed: tuple = ()) -> dict:
    """A ``.pt`` state file of a checkpoint (trainer state, RNG state), read with torch's safe loader.

    ``weights_only=True`` rebuilds tensors, numbers, strings and containers only, so a tampered file cannot run
    code (a pickled ``os.system`` call fails to load instead). Numpy arrays (the RNG state of checkpoints from
    before the state was kept as tensors) are allowed too: rebuilding one runs no code of the file's choosing;
    so are the plain data classes in ``allowed`` (DeepSpeed's enums and configs:
    ``deepspeed_internals.checkpoint_classes``).
    """
    import numpy as np
    import torch

    multiarray = getattr(np, "_core", np.core).multiarray
    allowed = [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32")), *allowed]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file, or one holding objects of other classes (torch's message says to
        # load it with weights_only=False: exactly what must not happen with a file from elsewhere)
        from llmrl.config import ConfigError

        raise ConfigError(f"checkpoint {Path(path).parent}: {Path(path).name} cannot be read as plain state (it is "
                          f"damaged, or holds Python objects besides tensors and numbers, which llmrl never "
                          f"unpickles): move this folder away to resume from the checkpoint before it") from None
