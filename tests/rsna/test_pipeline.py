"""Tiny training of every stage, exact resume, OOF, CV report and a valid submission (CPU, tiny profile)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import train
from tests.rsna.conftest import tiny_overrides
from utils import paths
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.rsna import layout, submit
from utils.rsna.metric import validate_submission


def test_stage1_run_folder_and_oof(tiny_stage1, tiny_output):
    for fold in (0, 1):
        run = paths.run_dir(tiny_stage1, fold)
        for name in (
            "config.yaml",
            "train.log",
            "metrics.csv",
            "curves.png",
            "last.pth",
            "best.pth",
        ):
            assert (run / name).is_file(), name
        ckpt = load_checkpoint(run / "best.pth")
        assert (
            ckpt["config"]["exp_name"] == "stage1_vertebra"
            and ckpt["fold"] == fold
            and ckpt["seed"] == 42
        )
        # best.pth is for inference: resume-only state lives in last.pth alone.
        assert "optimizer" not in ckpt and "optimizer" in load_checkpoint(run / "last.pth")
        metrics = pd.read_csv(run / "metrics.csv")
        assert {"train_loss", "val_loss", "val_ratio_mae", "val_box_mae", "lr"} <= set(
            metrics.columns
        )
    preds = pd.read_csv(paths.preds_csv(tiny_stage1))
    folds = pd.read_csv(tiny_output / "rsna" / "folds.csv")
    studies = pd.read_csv(tiny_output / "rsna" / "prep" / "studies.csv")
    # Every train study predicted, each by the model of its own (held-out) fold, every slice once.
    merged = preds.groupby("StudyInstanceUID").agg(fold=("fold", "first"), n=("slice", "size"))
    merged = merged.join(folds.set_index("StudyInstanceUID").rename(columns={"fold": "fold_file"}))
    assert (merged["fold"] == merged["fold_file"]).all()
    assert set(merged.index) == set(folds.StudyInstanceUID)
    assert (
        merged["n"] == studies.set_index("StudyInstanceUID").loc[merged.index, "n_slices"]
    ).all()
    assert preds[["x0", "C1", "C7"]].apply(lambda c: c.between(0, 1)).all().all()
    assert list(layout.viz_dir(tiny_stage1).glob("*.png"))


def test_stage2_and_cv_report(tiny_head, tiny_output):
    report = json.loads((tiny_output / "rsna" / "cv_report.json").read_text())
    for key in (
        "oof_metric",
        "baseline_prior",
        "baseline_noisy_or",
        "per_target_logloss",
        "per_target_auc",
        "n_studies",
    ):
        assert key in report
    chosen = json.loads((tiny_output / "rsna" / "patient_level.json").read_text())["patient_level"]
    assert (
        report["model"]
        == {"head": "stage 2 + patient head", "noisy_or": "stage 2 + noisy-OR"}[chosen]
    )
    assert report["n_studies"] == len(pd.read_csv(tiny_output / "rsna" / "folds.csv"))
    assert np.isfinite(report["oof_metric"]) and 0 < report["baseline_prior"] < 1
    assert (
        (tiny_output / "rsna" / "cv_report.md").read_text().startswith("# Cross-validation report")
    )
    assert (tiny_output / "rsna" / "cv_calibration.png").is_file()
    oof = pd.read_csv(tiny_output / "rsna" / "oof_predictions.csv")
    assert oof[["patient_overall", "C1"]].notna().all().all()


def test_submission_with_a_study_without_detections(
    tiny_head, tiny_data, tiny_output, tiny_ov, monkeypatch
):
    rows = pd.read_csv(tiny_data / "test.csv")
    blind = rows.StudyInstanceUID.iloc[0]
    original = submit.predict_stage1

    def no_vertebra_in_blind_study(*args, **kwargs):
        preds = original(*args, **kwargs)
        preds.loc[preds.StudyInstanceUID == blind, [f"C{i}" for i in range(1, 8)]] = 0.0
        return preds

    monkeypatch.setattr(submit, "predict_stage1", no_vertebra_in_blind_study)
    out = tiny_output / "rsna" / "submission.csv"
    inference.main(
        [
            "--CFG",
            "config/rsna/stage2_fracture.yaml",
            "--split",
            "test",
            "--out",
            str(out),
            *tiny_ov,
        ]
    )
    sub = pd.read_csv(out)
    assert sub.row_id.tolist() == rows.row_id.tolist()  # test.csv order
    validate_submission(sub, rows[["row_id"]].assign(fractured=0.0))
    assert sub.fractured.between(1e-6, 1 - 1e-6).all()
    loc = pd.read_csv(
        layout.stage2_labels_csv(load_config("config/rsna/base.yaml", tiny_ov), "test")
    )
    assert blind not in set(loc.StudyInstanceUID)
    assert sub[sub.row_id.str.startswith(blind)].fractured.gt(0).all()


def _snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` except the test-time folders, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "test" not in p.relative_to(root).parts[:1]
    }


def test_a_second_test_set_leaves_the_training_products_untouched(
    tiny_head, tiny_data, tiny_output, tiny_ov, tmp_path
):
    """`--split test --data-dir OTHER` keeps its cache and intermediates in its own folder."""
    other = tmp_path / "second_test_set"
    other.mkdir()
    shutil.copy(tiny_data / "test.csv", other / "test.csv")
    shutil.copytree(tiny_data / "test_images", other / "test_images")  # no train.csv: saved priors
    root = tiny_output / "rsna"
    before = _snapshot(root)
    out = tmp_path / "sub.csv"
    cfg = "config/rsna/patient_head.yaml"
    inference.main(
        ["--CFG", cfg, "--split", "test", "--data-dir", str(other), "--out", str(out), *tiny_ov]
    )
    assert _snapshot(root) == before
    sub = pd.read_csv(out)
    assert sub.row_id.tolist() == pd.read_csv(other / "test.csv").row_id.tolist()
    work = paths.test_dir(load_config(cfg, [*tiny_ov, f"data_dir={other}"]))
    assert work.parent == root / "test" and work.name.startswith("second_test_set-")
    cached = sorted(p.stem for p in (work / "prep" / "volumes").glob("*.npy"))
    assert cached == sorted(p.name for p in (other / "test_images").iterdir())
    assert (work / "stage2_labels_test.csv").is_file()


def test_an_unreadable_test_study_gets_the_priors(tiny_head, tiny_data, tiny_ov, tmp_path, caplog):
    """An empty study folder is named in the log and takes the train priors; the file is written."""
    other = tmp_path / "damaged"
    other.mkdir()
    shutil.copy(tiny_data / "test.csv", other / "test.csv")
    shutil.copy(tiny_data / "train.csv", other / "train.csv")
    shutil.copytree(tiny_data / "test_images", other / "test_images")
    rows = pd.read_csv(other / "test.csv")
    broken = rows.StudyInstanceUID.iloc[0]
    for f in (other / "test_images" / broken).iterdir():
        f.unlink()
    out = tmp_path / "sub.csv"
    caplog.set_level(logging.WARNING)
    cfg = "config/rsna/patient_head.yaml"
    inference.main(
        ["--CFG", cfg, "--split", "test", "--data-dir", str(other), "--out", str(out), *tiny_ov]
    )
    assert f"test study {broken} cannot be read" in caplog.text
    sub = pd.read_csv(out)
    assert sub.row_id.tolist() == rows.row_id.tolist()
    train = pd.read_csv(tiny_data / "train.csv").drop(columns="StudyInstanceUID")
    prior = (train.sum() + 1) / (len(train) + 2)  # add-one smoothed
    got = sub.set_index("row_id").fractured
    for target, p in prior.items():
        assert got[f"{broken}_{target}"] == pytest.approx(min(max(p, 1e-6), 1 - 1e-6))


def test_unknown_component_is_a_one_line_error_before_any_run_folder(tiny_data, tiny_output):
    tiny_ov = [*tiny_overrides(tiny_data, tiny_output), "exp_name=never_made", "model.name=resnet"]
    with pytest.raises(SystemExit, match=r"^error: unknown model 'resnet'; valid: .*fracture_seq"):
        train.main(["--CFG", "config/rsna/stage1_vertebra.yaml", *tiny_ov])
    tiny_ov[-1] = "model.params.dropuot=0.5"
    with pytest.raises(SystemExit, match=r"^error: model 'vertebra_bbox_ratio' got unknown params"):
        train.main(["--CFG", "config/rsna/stage1_vertebra.yaml", *tiny_ov])
    assert not (tiny_output / "rsna" / "never_made").exists()


def _state(path):
    return load_checkpoint(path)["model"]


def test_resume_equals_straight_run(tiny_data, tiny_output):
    base = [*tiny_overrides(tiny_data, tiny_output), "train.epochs=2", "dataset.params.aug=1.0"]
    train.main(
        ["--CFG", "config/rsna/stage1_vertebra.yaml", "--fold", "0", *base, "exp_name=straight"]
    )
    train.main(
        [
            "--CFG",
            "config/rsna/stage1_vertebra.yaml",
            "--fold",
            "0",
            *base,
            "exp_name=resumed",
            "train.stop_after=1",
        ]
    )
    cfg = load_config("config/rsna/stage1_vertebra.yaml", [*base, "exp_name=resumed"])
    assert load_checkpoint(paths.checkpoint_path(cfg, 0, "last"))["epoch"] == 0
    train.main(
        ["--CFG", "config/rsna/stage1_vertebra.yaml", "--fold", "0", *base, "exp_name=resumed"]
    )
    a = _state(paths.checkpoint_path(cfg, 0, "last", exp="straight"))
    b = _state(paths.checkpoint_path(cfg, 0, "last"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = pd.read_csv(paths.run_dir(cfg, 0, "straight") / "metrics.csv").drop(columns="seconds")
    mb = pd.read_csv(paths.run_dir(cfg, 0) / "metrics.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ma, mb)


def test_resume_refuses_a_changed_config_and_skips_finished_folds(tiny_data, tiny_output, caplog):
    caplog.set_level(logging.INFO)
    base = [*tiny_overrides(tiny_data, tiny_output), "train.epochs=1", "exp_name=guarded"]
    train.main(["--CFG", "config/rsna/stage1_vertebra.yaml", "--fold", "0", *base])
    with pytest.raises(SystemExit, match=r"different config \(train.lr\)"):
        train.main(
            ["--CFG", "config/rsna/stage1_vertebra.yaml", "--fold", "0", *base, "train.lr=0.1"]
        )
    train.main(["--CFG", "config/rsna/stage1_vertebra.yaml", "--fold", "0", *base])
    assert "already trained" in caplog.text
    with pytest.raises(SystemExit, match="--fold must be"):
        train.main(["--CFG", "config/rsna/stage1_vertebra.yaml", "--fold", "7", *base])
