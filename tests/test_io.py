"""Atomic writes: a killed writer leaves nothing a rerun trusts, finished files get normal modes."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import InputError
from utils.io import FILE_MODE, changed_files, file_sizes, write_text

_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from utils.checkpoint import save_checkpoint

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"x" * 1_000_000)  # half a checkpoint on disk
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    save_checkpoint({"w": torch.zeros(3)}, sys.argv[1])
    """
)


def test_a_killed_checkpoint_save_leaves_nothing_after_the_rerun(tmp_path):
    target = tmp_path / "run" / "last.pth"
    save_checkpoint({"epoch": 1}, target)
    res = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(target)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == -9
    temps = [p.name for p in target.parent.iterdir() if p.name != "last.pth"]
    assert len(temps) == 1 and temps[0].startswith(".last.pth.")  # what the kill left
    save_checkpoint({"epoch": 2}, target)  # the rerun's next save
    assert [p.name for p in target.parent.iterdir()] == ["last.pth"]
    assert target.stat().st_mode & 0o777 == FILE_MODE


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    path = write_text("x", tmp_path / "a.csv")
    with open(tmp_path / "b.csv", "w") as f:
        f.write("x")
    assert path.stat().st_mode & 0o777 == (tmp_path / "b.csv").stat().st_mode & 0o777 == FILE_MODE


def test_a_full_disk_during_a_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    target = write_text("previous\n", tmp_path / "report.md")

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text("new content\n", target)
    monkeypatch.undo()
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            "not a readable checkpoint",
        ),
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "not a readable checkpoint"),
        (
            lambda p: torch.save({"weights": torch.zeros(2)}, p),
            "not a checkpoint of this repository",
        ),
    ],
    ids=["truncated", "garbage", "foreign"],
)
def test_a_damaged_or_foreign_checkpoint_is_one_error_naming_it(tmp_path, damage, message):
    path = save_checkpoint(
        {"model": {"w": torch.ones(64, 64)}, "config": {}}, tmp_path / "best.pth"
    )
    assert load_checkpoint(path)["model"]["w"].sum() == 64 * 64
    damage(path)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))} is {message}") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_file_sizes_find_a_truncated_product(tmp_path):
    (tmp_path / "sub").mkdir()
    write_text("a" * 100, tmp_path / "sub" / "a.png")
    write_text("b" * 10, tmp_path / "b.csv")
    record = file_sizes(tmp_path)
    assert record == {"b.csv": 10, "sub/a.png": 100}
    assert changed_files(tmp_path, record) == []
    (tmp_path / "sub" / "a.png").write_text("a" * 50)
    (tmp_path / "b.csv").unlink()
    assert changed_files(tmp_path, record) == ["b.csv", "sub/a.png"]
