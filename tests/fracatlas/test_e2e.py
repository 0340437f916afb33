"""End to end: `sh train.sh fracatlas DATA` on the tiny synthetic preset (slow: minutes on 2 cores).

Covers what needs nnU-Net to run: the converted dataset.json passes
``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``, the short trainer (found through
nnUNet_extTrainer) trains every fold and predicts on CPU, OOF + test maps feed the mask-guided
classifier, and the report holds both AUCs beside the Dice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.fracatlas.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_sh_fracatlas_tiny(tmp_path):
    data, out = tmp_path / "data", tmp_path / "output"
    generate(data, "tiny", seed=1)
    env = {**os.environ, "PROFILE": "tiny", "OUTPUT": str(out), "PYTHON": sys.executable}
    cmd = ["sh", "train.sh", "fracatlas", str(data), "device=cpu"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "--verify_dataset_integrity" in run.stdout
    assert "Using trainer 'nnUNetTrainerSmoke'" in run.stdout + run.stderr
    products = out / "fracatlas"
    report = json.loads((products / "cv_report.json").read_text())
    for key in ("seg_dice", "seg_iou", "cls_auc", "cls_auc_mask_guided", "n_images"):
        assert key in report
    assert report["cls_auc"] is not None and report["cls_auc_mask_guided"] is not None
    assert report["segmentation_test"]["n_seg_images"] >= 1
    assert report["classifier_test"]["guided"]["n"] >= 1
    assert (products / "cv_roc.png").is_file() and list((products / "overlays").glob("*.png"))
    assert "mask-guided" in run.stdout
