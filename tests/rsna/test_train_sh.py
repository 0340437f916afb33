"""End to end: `sh train.sh` on the tiny synthetic preset (slow: ~2 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from utils.rsna.metric import score_submission, truth_to_long

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_sh_tiny_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "output"
    env = {
        **os.environ,
        "PROFILE": "tiny",
        "OUTPUT": str(out),
        "PYTHON": sys.executable,
        "WORKERS": "1",
    }
    # One tiny epoch cannot localise vertebrae: accept every slice so stage 2 has input.
    cmd = ["sh", "train.sh", str(tiny_data), "localize.vert_thresh=0.001"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OOF competition metric" in run.stdout and "submission:" in run.stdout
    products = out / "rsna"
    report = json.loads((products / "cv_report.json").read_text())
    assert report["n_studies"] == len(pd.read_csv(tiny_data / "train.csv"))
    sub = pd.read_csv(products / "submission.csv")
    answers = truth_to_long(pd.read_csv(tiny_data / "test_labels.csv"))
    assert 0 < score_submission(sub, answers) < 5
    # A second run finds every step done and changes nothing.
    before = (products / "stage2_fracture" / "fold0" / "last.pth").stat().st_mtime
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained" in again.stderr + again.stdout
    assert (products / "stage2_fracture" / "fold0" / "last.pth").stat().st_mtime == before
