"""Atomic writes: a killed writer leaves nothing a rerun trusts, finished files get normal modes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT
from utils.checkpoint import save_checkpoint
from utils.io import FILE_MODE, write_text

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
