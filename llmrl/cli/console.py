"""What every command-line entry point shares: quiet third-party noise, one clear line for user errors."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable

# Warnings that say nothing actionable to an llmrl user (bitsandbytes' optional CPU kernel package).
NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
# Seconds a rank other than 0 waits before exiting quietly on a ConfigError: the launchers (deepspeed, torchrun) stop
# every rank as soon as one exits with an error, which must not cut rank 0 off before it printed the line.
QUIET_RANK_GRACE = 3.0


def config_parser(description: str, config_help: str, required: bool = True,
                  overrides_help: str = "single-key overrides: section.key=value (e.g. train.total_steps=10)"
                  ) -> argparse.ArgumentParser:
    """The arguments every llmrl command shares: ``--config YAML`` and ``section.key=value`` overrides.

    Parse with ``parse_intermixed_args`` so that overrides may come before or after the options.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=required, default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser


def run_cli(body: Callable[[], object]) -> int:
    """Run ``body``; a ConfigError or another user-facing error becomes 'error: ...' on stderr and exit code 2."""
    from llmrl.errors import UserError

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from llmrl.errors import ConfigError

    try:
        body()
    except UserError as e:
        if isinstance(e, ConfigError) and launched_rank() != 0:
            # A bad setting fails alike on every rank: rank 0 says so, once, instead of one line per rank. (A
            # ConfigError only a later rank raises goes unprinted: every config check runs on every rank.)
            try:
                time.sleep(QUIET_RANK_GRACE)
            except KeyboardInterrupt:
                return 130
            return e.exit_code
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing after the last checkpoint was kept; pass --resume to continue from it",
              file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a folder that cannot be written: the system's one line says which
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


def launched_rank() -> int:
    """This process's global rank as the launcher (deepspeed, torchrun) set it; 0 in a plain process."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def one_line(text: str) -> str:
    """A message quoting another library's (often several lines) on one line."""
    return " ".join(text.split())

