"""User mistakes and damaged inputs: one ``error: …`` line (or a logged skip), a non-zero exit,
nothing half-written, on the RSNA entry points. Cases tested next to their module: the metric
CLI's bad submissions (test_metric.py), unreadable / odd DICOM slices and studies
(test_dicom.py), an unknown component and an unreadable test study (test_pipeline.py); OOF
without a fold file (tests/test_generic_inference.py), killed and atomic writes
(tests/test_io.py), HipMRI's unpaired, odd-shaped and float-valued slices
(tests/hipmri/test_hipmri.py), nnU-Net's parallel-fold misuse (tests/test_nnunet.py)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import inference
import train
from tests.rsna.conftest import ROOT, tiny_overrides
from utils.io import write_text
from utils.preprocess_data import main as prep_main
from utils.rsna.cross_style import main as cross_style_main
from utils.rsna.localize import main as localize_main
from utils.rsna.metric import TARGETS
from utils.rsna.submit import write_submission
from utils.rsna.synthetic.generator import main as synthetic_main

STAGE1 = str(ROOT / "config" / "rsna" / "stage1_vertebra.yaml")


def _error(fn, argv) -> str:
    """Run an entry point that must stop with one ``error:`` line; return that line."""
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_train_unknown_key_on_the_command_line(tiny_data, tiny_output):
    before = _files(tiny_output)
    msg = _error(
        train.main, ["--CFG", STAGE1, *tiny_overrides(tiny_data, tiny_output), "train.nope=1"]
    )
    assert msg.startswith("error: unknown config key 'train.nope' (command line)")
    assert "valid keys under 'train': amp, batch_size" in msg
    assert _files(tiny_output) == before


def test_preprocess_refuses_train_images_without_train_csv(tmp_path):
    (tmp_path / "data" / "train_images" / "1.2.3").mkdir(parents=True)
    msg = _error(
        prep_main,
        ["--pipeline", "rsna", f"data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}"],
    )
    assert (
        msg
        == f"error: {tmp_path / 'data' / 'train_images'} has no train.csv beside it (the study labels): copy it from the competition data"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: None, "error: data folder not found: {d}"),
        (lambda d: (d / "test_images").mkdir(parents=True), "error: {d}: no study folders in train_images/ or test_images/"),
        (lambda d: d.mkdir(), "error: {d} is not a competition folder (no train.csv or test_images/)"),
    ],
)  # fmt: skip
def test_preprocess_refuses_folders_without_studies(tmp_path, make, expected):
    data = tmp_path / "data"
    make(data)
    msg = _error(
        prep_main, ["--pipeline", "rsna", f"data_dir={data}", f"output_dir={tmp_path / 'out'}"]
    )
    assert msg == expected.format(d=data)
    assert not (tmp_path / "out").exists()


def test_preprocess_unknown_key(tmp_path):
    msg = _error(prep_main, ["--pipeline", "rsna", "cache.sise=64", f"output_dir={tmp_path}"])
    assert msg.startswith(
        "error: unknown config key 'cache.sise' (command line); valid keys under 'cache': size, window"
    )


def test_localisation_without_stage1_oof(tiny_data, tmp_path):
    out = tmp_path / "out"
    cfg = str(ROOT / "config" / "rsna" / "stage2_fracture.yaml")
    msg = _error(localize_main, ["--CFG", cfg, *tiny_overrides(tiny_data, out)])
    assert msg == (
        f"error: {out / 'rsna' / 'stage1_vertebra' / 'preds_oof.csv'} not found: run the stage-1 "
        "OOF pass (inference.py) first"
    )
    assert _files(out) == []


def test_cross_style_needs_the_answers(tiny_data, tmp_path):
    (tmp_path / "unseen").mkdir()
    head = str(ROOT / "config" / "rsna" / "patient_head.yaml")
    argv = [
        "--CFG",
        head,
        "--data-dir",
        str(tmp_path / "unseen"),
        *tiny_overrides(tiny_data, tmp_path / "out"),
    ]
    assert (
        _error(cross_style_main, argv)
        == f"error: {tmp_path / 'unseen' / 'test_labels.csv'} not found: the cross-style set needs its answers"
    )
    assert _files(tmp_path / "out") == []


def test_generator_refuses_a_non_empty_folder(tmp_path):
    write_text("keep me", tmp_path / "data" / "notes.txt")
    msg = _error(synthetic_main, ["--out", str(tmp_path / "data"), "--preset", "tiny"])
    assert msg == f"error: {tmp_path / 'data'}: folder not empty; pass --overwrite to replace it"
    assert _files(tmp_path / "data") == [tmp_path / "data" / "notes.txt"]


def test_repeated_test_rows_give_one_submission_row_each(tmp_path, caplog):
    uid = "1.2.3"
    rows = pd.DataFrame(
        [(f"{uid}_{t}", uid, t) for t in TARGETS] + [(f"{uid}_C1", uid, "C1")],
        columns=["row_id", "StudyInstanceUID", "prediction_type"],
    )
    wide = pd.DataFrame([[uid, *np.linspace(0.2, 0.9, 8)]], columns=["StudyInstanceUID", *TARGETS])
    with caplog.at_level(logging.WARNING):
        sub = write_submission(rows, wide, dict.fromkeys(TARGETS, 0.3), tmp_path / "sub.csv")
    assert sub.row_id.tolist() == rows.row_id.iloc[:8].tolist()
    assert "test.csv repeats 1 row_id(s) (1.2.3_C1): one row each" in caplog.text
    assert pd.read_csv(tmp_path / "sub.csv").shape == (8, 2)


def test_a_truncated_checkpoint_stops_inference_with_one_line_naming_it(
    tiny_head, tiny_ov, tmp_path
):
    out = tmp_path / "output"
    shutil.copytree(tiny_head.output_dir, out, ignore=shutil.ignore_patterns("test"))
    best = out / "rsna" / "stage2_fracture" / "fold1" / "best.pth"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    (out / "rsna" / "stage2_fracture" / "preds_oof.csv").unlink()
    ov = [o for o in tiny_ov if not o.startswith("output_dir=")] + [f"output_dir={out}"]
    message = _error(
        inference.main, ["--CFG", "config/rsna/stage2_fracture.yaml", "--split", "oof", *ov]
    )
    assert str(best) in message and "not a readable checkpoint" in message
