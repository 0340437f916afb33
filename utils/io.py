"""Atomic file writes: a crash never leaves a half-written output behind.

Every product of the pipeline is written to a temporary file in the destination folder and
moved into place with ``os.replace`` (atomic on POSIX when source and target share a file system).
The finished file gets the mode a plain ``open()`` would give (0666 minus the umask), not
``mkstemp``'s 0600. A writer killed mid-write (SIGKILL, out of memory) cannot delete its
temporary file; the temp's name carries the writer's pid, so the next write of the same target
removes temps whose writer is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open(path, "w") would create


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temporaries of ``path`` left by writers that no longer run; returns them."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    stale = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        m = pattern.match(tmp.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)
            stale.append(tmp)
    return stale


def glob_escape(name: str) -> str:
    """``name`` with glob wildcards escaped (``[`` ``*`` ``?`` match literally)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The caller writes the whole file to the yielded path. On an exception the temporary file is
    removed and ``path`` is left untouched (an older complete version, if any, survives).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """Byte size of every file below ``folder`` (relative POSIX paths): a record to check a
    product folder against later, since a truncated or rewritten file has another size."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def changed_files(folder: str | os.PathLike, record: dict[str, int]) -> list[str]:
    """The files of ``record`` missing from ``folder`` or of another size (relative paths)."""
    folder = Path(folder)
    return [
        rel
        for rel, size in record.items()
        if not (folder / rel).is_file() or (folder / rel).stat().st_size != size
    ]


def read_csv(path: str | os.PathLike, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failure on a missing, empty or malformed file is one InputError
    naming the file."""
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err})") from None


def write_csv(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> Path:
    """Write ``df`` as CSV atomically (no index unless asked); an identical file is left as it is."""
    kwargs.setdefault("index", False)
    return write_text(df.to_csv(**kwargs), path)


def append_row(row: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Append one row to a CSV table, atomically: the whole table is rewritten to a temporary
    file and moved into place, so a crash leaves the previous complete table.

    Concurrent appenders (several folds or pipelines at once) take turns on an exclusive lock of
    ``.<name>.lock`` beside the table: a read-modify-write without it could lose a row. Earlier
    rows are kept as written (read as text); a key the table lacks adds a column.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else None
        new = pd.DataFrame([{k: "" if v is None else v for k, v in row.items()}])
        return write_csv(new if old is None else pd.concat([old, new], ignore_index=True), path)


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
