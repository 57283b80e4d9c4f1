"""``python -m llmrl ...`` from the bench scripts that drive whole runs (offline_rl.py, tune_equal_compute.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def llmrl(*args: str, log: Path) -> float:
    """Run ``python -m llmrl ARGS`` in the repository (output to ``log``); its wall seconds; raises when it fails."""
    start = time.time()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "llmrl", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"llmrl {args[0]} failed (exit {done.returncode}): see {log}")
    return time.time() - start
