"""Every path the pipeline reads or writes is built here, and only here.

Data (the Kaggle competition layout under ``cfg.data_dir``)::

    train.csv  test.csv  sample_submission.csv  train_bounding_boxes.csv
    train_images/<uid>/<n>.dcm  test_images/<uid>/<n>.dcm  segmentations/<uid>.nii

Products (under ``cfg.output_dir``)::

    prep/studies.csv  prep/stage1_labels.csv  prep/volumes/<uid>.npy     utils/preprocess_data.py
    folds.csv                                                            utils/fold_split.py
    <exp>/fold<k>/{config.yaml,train.log,metrics.csv,curves.png,last.pth,best.pth}   train.py
    <exp>/preds_<split>.csv  <exp>/viz/*.png                             inference.py
    stage2_labels_<split>.csv                                            utils/stage2_labels.py
    cv_report.{md,json}  cv_calibration.png  oof_predictions.csv  submission.csv   inference.py
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

Cfg = Mapping[str, Any]


# ---- competition data ---------------------------------------------------------------------------
def data_dir(cfg: Cfg) -> Path:
    return Path(cfg["data_dir"])


def labels_csv(data: Path) -> Path:
    """train.csv: StudyInstanceUID + patient_overall, C1..C7."""
    return Path(data) / "train.csv"


def test_csv(data: Path) -> Path:
    return Path(data) / "test.csv"


def images_dir(data: Path, split: str) -> Path:
    """``train_images`` or ``test_images``; split is ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return Path(data) / f"{split}_images"


def study_dir(data: Path, split: str, uid: str) -> Path:
    return images_dir(data, split) / uid


def segmentation_path(data: Path, uid: str) -> Path:
    return Path(data) / "segmentations" / f"{uid}.nii"


# ---- preprocessing products ---------------------------------------------------------------------
def prep_dir(cfg: Cfg) -> Path:
    return Path(cfg["output_dir"]) / "prep"


def studies_csv(prep: Path) -> Path:
    """One row per study: geometry, transfer syntaxes, reversed flag, skipped slices."""
    return Path(prep) / "studies.csv"


def stage1_labels_csv(prep: Path) -> Path:
    """One row per slice of a segmented study: C1..C7 ratios and the normalised C1-C7 box."""
    return Path(prep) / "stage1_labels.csv"


def volume_path(prep: Path, uid: str) -> Path:
    """Windowed uint8 volume (Z, S, S), head -> feet, memory-mappable."""
    return Path(prep) / "volumes" / f"{uid}.npy"


def folds_csv(cfg: Cfg) -> Path:
    """The one fold file every stage reads (StudyInstanceUID, fold)."""
    return Path(cfg["output_dir"]) / "folds.csv"


# ---- runs ---------------------------------------------------------------------------------------
def exp_dir(cfg: Cfg, exp: str | None = None) -> Path:
    return Path(cfg["output_dir"]) / (exp or cfg["exp_name"])


def run_dir(cfg: Cfg, fold: int, exp: str | None = None) -> Path:
    return exp_dir(cfg, exp) / f"fold{fold}"


def checkpoint_path(cfg: Cfg, fold: int, kind: str = "best", exp: str | None = None) -> Path:
    if kind not in ("best", "last"):
        raise ValueError(f"checkpoint kind must be 'best' or 'last', got {kind!r}")
    return run_dir(cfg, fold, exp) / f"{kind}.pth"


def preds_csv(cfg: Cfg, split: str, exp: str | None = None) -> Path:
    """Predictions of one stage: ``oof`` (train studies, out of fold) or ``test``."""
    return exp_dir(cfg, exp) / f"preds_{split}.csv"


def viz_dir(cfg: Cfg, exp: str | None = None) -> Path:
    return exp_dir(cfg, exp) / "viz"


def stage2_labels_csv(cfg: Cfg, split: str) -> Path:
    """Per (study, vertebra): slice range and crop box derived from stage-1 predictions."""
    return Path(cfg["output_dir"]) / f"stage2_labels_{split}.csv"


def cv_report(cfg: Cfg, suffix: str) -> Path:
    """``cv_report.md`` / ``cv_report.json``."""
    return Path(cfg["output_dir"]) / f"cv_report.{suffix}"


def oof_csv(cfg: Cfg) -> Path:
    """Final OOF probabilities per study (wide: patient_overall, C1..C7), as scored in the CV report."""
    return Path(cfg["output_dir"]) / "oof_predictions.csv"


def calibration_png(cfg: Cfg) -> Path:
    return Path(cfg["output_dir"]) / "cv_calibration.png"


def submission_csv(cfg: Cfg) -> Path:
    return Path(cfg["output_dir"]) / "submission.csv"
