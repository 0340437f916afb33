"""Atomic file writes: a crash never leaves a half-written output behind.

Every product of the pipeline is written to a temporary file in the destination folder and
moved into place with ``os.replace`` (atomic on POSIX when source and target share a file system).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The caller writes the whole file to the yielded path. On an exception the temporary file is
    removed and ``path`` is left untouched (an older complete version, if any, survives).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> Path:
    """Write ``df`` as CSV atomically (no index unless asked); an identical file is left as it is."""
    kwargs.setdefault("index", False)
    return write_text(df.to_csv(**kwargs), path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically; a file that already holds ``text`` is not touched.

    Keeping an unchanged product's modification time lets the freshness checks downstream
    (e.g. an OOF file reused while newer than its inputs) survive a rerun that changes nothing.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(text.encode()) and path.read_text() == text:
        return path
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_npy(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Save ``array`` as a memory-mappable ``.npy`` file atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return Path(path)
