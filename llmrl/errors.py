"""The errors a user can cause and fix. The command line (``llmrl.cli.console.run_cli``) prints their message on one
line, ``error: ...``, and exits with their ``exit_code``; any other exception is a bug and keeps its traceback.

This module imports nothing, so that every part of llmrl can raise these without importing another part.
"""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (its type's name when it has none), at most ``limit`` characters: for
    quoting another library's exception inside one of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class UserError(Exception):
    """A failure the message tells the user how to fix."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message says how to fix it."""


class RunStopped(UserError, RuntimeError):
    """A run stopped for a reason the user can act on (divergence, a full disk, Ctrl-C); the message names the
    step, the last good checkpoint and what to do."""


class RewardError(UserError, RuntimeError):
    """A reward raised, hung or returned something unusable; the message names the reward and the sample."""


class EnvError(UserError, RuntimeError):
    """An environment raised in ``reset``/``step`` or returned something unusable; the message names the
    environment, the episode and the turn."""


class RewardCallFailed(RewardError):
    """The reward raised or hung: possibly passing (a busy service), unlike a bad returned value."""
