"""What a user can fix, as exception types (the one error path that reports them: utils/cli.py).

A bad configuration raises :class:`~utils.config.ConfigError`, a missing or malformed input (a
file, a column, a study) :class:`InputError`, a failed external command (nnU-Net's CLI, which
prints its own traceback) :class:`CommandError`. All three are :class:`UserError`: an entry
point reports them as one ``error: …`` line with exit status 1. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the file, key, case or command."""


class InputError(UserError, ValueError):
    """A missing or malformed input; the message names the file, key or case."""


class CommandError(UserError, RuntimeError):
    """An external command failed or its inputs are missing (the message names which)."""
