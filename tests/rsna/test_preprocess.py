"""Stage-1 labels with known answers, continuity cleaning, and preprocessing of the tiny data set."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, preprocess
from utils.rsna import layout
from utils.rsna.preprocess import clean_labels, stage1_labels


def test_stage1_labels_known_answers():
    """C1 on slices 0-1 (areas 4 and 2), C2 on slices 1-2 (areas 6 and 3); slice 3 empty."""
    seg = np.zeros((4, 10, 20), np.uint8)
    seg[0, 2:4, 5:7] = 1  # C1: 4 px, rows 2-3, cols 5-6
    seg[1, 0:1, 0:2] = 1  # C1: 2 px
    seg[1, 5:8, 10:12] = 2  # C2: 6 px
    seg[2, 9:10, 17:20] = 2  # C2: 3 px
    seg[2, 0, 0] = 9  # a thoracic label is ignored
    df = stage1_labels(seg)
    assert df["C1"].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert df["C2"].tolist() == [0.0, 1.0, 0.5, 0.0]
    assert (df[["C3", "C4", "C5", "C6", "C7"]] == 0).all().all()
    assert df["vertebrae"].tolist() == [1, 1, 1, 0]
    # Box normalised by width (20) and height (10) separately, x1/y1 exclusive.
    np.testing.assert_allclose(
        df.loc[0, ["x0", "y0", "x1", "y1"]], [5 / 20, 2 / 10, 7 / 20, 4 / 10]
    )
    np.testing.assert_allclose(
        df.loc[1, ["x0", "y0", "x1", "y1"]], [0 / 20, 0 / 10, 12 / 20, 8 / 10]
    )
    np.testing.assert_allclose(
        df.loc[2, ["x0", "y0", "x1", "y1"]], [17 / 20, 9 / 10, 20 / 20, 10 / 10]
    )
    np.testing.assert_allclose(df.loc[3, ["x0", "y0", "x1", "y1"]], 0.0)


def test_continuity_cleaning_drops_stray_labels():
    present = np.zeros((6, 7), bool)
    present[0, 0] = True  # C1
    present[1, [0, 1]] = True  # C1, C2
    present[2, [1, 5]] = True  # C2 and a stray C6
    present[3, [1, 2]] = True  # C2, C3
    present[4, 2] = True  # C3
    present[5, 0] = True  # a stray C1 below C3
    kept = clean_labels(present)
    expected = present.copy()
    expected[2, 5] = False
    expected[5, 0] = False
    np.testing.assert_array_equal(kept, expected)


def test_stray_voxels_do_not_count_in_ratio_or_box():
    seg = np.zeros((3, 8, 8), np.uint8)
    seg[0, 1:3, 1:3] = 1
    seg[1, 1:3, 1:3] = 2
    seg[1, 7, 7] = 6  # stray C6 voxel: must not widen the box nor create a C6 ratio
    seg[2, 1:3, 1:3] = 3
    df = stage1_labels(seg)
    assert df["C6"].sum() == 0
    np.testing.assert_allclose(df.loc[1, ["x0", "y0", "x1", "y1"]], [1 / 8, 1 / 8, 3 / 8, 3 / 8])


def test_preprocess_tiny(tiny_data, tiny_output):
    prep = tiny_output / "rsna" / "prep"
    studies = pd.read_csv(layout.studies_csv(prep))
    train = pd.read_csv(tiny_data / "train.csv")
    n_test = len([p for p in (tiny_data / "test_images").iterdir() if p.is_dir()])
    assert len(studies) == len(train) + n_test
    for col in [
        "StudyInstanceUID",
        "split",
        "n_files",
        "n_slices",
        "rows",
        "cols",
        "reversed",
        "n_skipped",
        "transfer_syntaxes",
        "z_spacing",
        "pixel_spacing_row",
        "has_seg",
    ]:
        assert col in studies.columns
    assert studies["reversed"].any() and (studies["rows"] != studies["cols"]).any()
    labels = pd.read_csv(layout.stage1_labels_csv(prep))
    seg_studies = studies[studies.has_seg]
    assert len(labels) == seg_studies["n_slices"].sum()
    for _, row in studies.iterrows():
        vol = np.load(layout.volume_path(prep, row.StudyInstanceUID), mmap_mode="r")
        assert vol.shape == (row.n_slices, 64, 64) and vol.dtype == np.uint8
    # Every segmented study has each vertebra's peak ratio at exactly 1, and C1 above C7.
    for _, g in labels.groupby("StudyInstanceUID"):
        assert np.allclose(g[[f"C{i}" for i in range(1, 8)]].max(), 1.0)
        assert g.loc[g["C1"] > 0, "slice"].mean() < g.loc[g["C7"] > 0, "slice"].mean()
    assert json.loads((prep / "cache.json").read_text())["size"] == 64


def test_preprocess_resumes_and_refuses_other_cache_settings(tiny_data, tiny_output, caplog):
    caplog.set_level(logging.INFO)
    prep = tiny_output / "rsna" / "prep"
    before = layout.studies_csv(prep).read_bytes()
    run = ("--data-dir", str(tiny_data), f"output_dir={tiny_output}", "profile=tiny")
    preprocess("rsna", *run)
    assert "0 studies to process" in caplog.text
    assert layout.studies_csv(prep).read_bytes() == before
    with pytest.raises(SystemExit, match="cache built with"):
        preprocess("rsna", *run, "cache.size=32")


def _prep_copy(tiny_data, tiny_output, tmp_path) -> tuple[Path, tuple[str, ...]]:
    """A private copy of the tiny preprocessing products and the overrides that reach it."""
    out = tmp_path / "out"
    shutil.copytree(tiny_output / "rsna" / "prep", out / "rsna" / "prep")
    return out / "rsna" / "prep", (
        "--data-dir",
        str(tiny_data),
        f"output_dir={out}",
        "profile=tiny",
    )


def test_a_truncated_cache_is_rebuilt_on_rerun(tiny_data, tiny_output, tmp_path, caplog):
    prep, run = _prep_copy(tiny_data, tiny_output, tmp_path)
    uid = sorted(p.stem for p in (prep / "volumes").glob("*.npy"))[0]
    volume = layout.volume_path(prep, uid)
    intact = np.load(volume)
    volume.write_bytes(volume.read_bytes()[: volume.stat().st_size // 2])  # half a file
    caplog.set_level(logging.INFO)
    preprocess("rsna", *run)
    assert f"cached volume {volume} is damaged" in caplog.text
    assert "1 studies to process" in caplog.text
    np.testing.assert_array_equal(np.load(volume), intact)


def test_preprocessing_killed_midway_resumes_without_redoing_finished_studies(tiny_data, tmp_path):
    """A real SIGKILL in the middle of preprocessing; the rerun processes only what was not done
    and the tables equal those of an uninterrupted run."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "utils.preprocess_data", "--pipeline", "rsna"]
    cmd += ["--data-dir", str(tiny_data), f"output_dir={out}", "profile=tiny"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    parts = layout.parts_dir(out / "rsna" / "prep")
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.json")))
    n_studies = sum(1 for s in ("train", "test") for _ in (tiny_data / f"{s}_images").iterdir())
    assert 3 <= done < n_studies
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert f"{n_studies - done} studies to process" in rerun.stderr
    straight = tmp_path / "straight"
    preprocess("rsna", "--data-dir", str(tiny_data), f"output_dir={straight}", "profile=tiny")
    for table in ("studies.csv", "stage1_labels.csv"):
        a = pd.read_csv(out / "rsna" / "prep" / table).drop(columns="seconds", errors="ignore")
        b = pd.read_csv(straight / "rsna" / "prep" / table).drop(columns="seconds", errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    for volume in (straight / "rsna" / "prep" / "volumes").glob("*.npy"):
        resumed = out / "rsna" / "prep" / "volumes" / volume.name
        np.testing.assert_array_equal(np.load(resumed), np.load(volume))
