"""One run per run folder: an exclusive ``flock`` on ``run.output_dir/.llmrl-lock``, held by the run's main process
for its whole life. The kernel releases it when that process ends however it ends (kill -9 included), so a lock
is never left behind by a dead run; the file itself stays and holds the pid of the last run that took it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from llmrl.config import ConfigError

LOCK_FILE = ".llmrl-lock"


class RunLock:
    """The held lock of one run folder; released by ``release()`` or when this process ends."""

    def __init__(self, fd: int, run_dir: Path, created: list[Path], previous: bytes | None):
        # previous: what the lock file held before (the pid of the last run), None when this run made the file
        self.fd, self.run_dir, self.created, self.previous = fd, run_dir, created, previous

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor of the open file releases the flock
            self.fd = None

    def abandon(self) -> None:
        """The run was refused before it wrote anything: remove the lock file (while still holding it) and the
        folders, when taking the lock made them, so that a refused run leaves the disk as it found it."""
        if self.fd is None:
            return
        if self.previous is None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        else:  # the folder's own lock file, as it was
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, self.previous, 0)
        self.release()
        for folder in self.created:  # deepest first; only while empty
            try:
                folder.rmdir()
            except OSError:
                break

    def __del__(self):
        self.release()


def holder_pid(run_dir: Path) -> str:
    try:
        text = (run_dir / LOCK_FILE).read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def lock_run_dir(run_dir: Path) -> RunLock:
    """Create ``run_dir`` if needed and lock it; a ConfigError naming the holder's pid when another run has it."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} cannot be created ({e.strerror}): choose a folder you "
                          f"can write") from None
    path = run_dir / LOCK_FILE
    while True:
        try:
            try:  # whether this run made the lock file: a refused run removes only a file of its own
                fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), True
            except FileExistsError:
                fd, made = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), False
        except FileNotFoundError:  # removed between the two opens: try again
            continue
        except OSError as e:
            raise ConfigError(f"run.output_dir = {str(run_dir)!r}: its lock file {LOCK_FILE} cannot be opened "
                              f"({e.strerror}): choose a folder you can write, or move {LOCK_FILE} away if it is "
                              f"not a plain file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"run.output_dir = {str(run_dir)!r} is in use by another llmrl run (pid "
                              f"{holder_pid(run_dir)}): one run writes a run folder at a time; wait for that run to "
                              f"end (or stop it), or choose another run.output_dir") from None
        # A refused run removes its lock file (abandon): if that happened between our open and our flock, we hold
        # a lock on a file no longer there; take the one that is there now instead.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    previous = os.read(fd, 64)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(fd, run_dir, created if made else [], None if made else previous)
