"""User mistakes vs bugs: one error path for every entry point.

A missing or malformed input (a file, a column, a study) raises :class:`InputError`, a bad
configuration :class:`~utils.config.ConfigError`; each entry point's ``main`` runs inside
:func:`user_errors`, which turns both into one ``error: …`` line and exit status 1 (argparse uses
2 for bad flags). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from utils.config import ConfigError


class InputError(ValueError):
    """A missing or malformed input; the message names the file, key or case."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise ConfigError / InputError as ``SystemExit("error: …")`` (no traceback)."""
    try:
        yield
    except (ConfigError, InputError) as err:
        raise SystemExit(f"error: {err}") from None
