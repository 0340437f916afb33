"""RSNA 2022 paths: the Kaggle competition layout and the RSNA-only products (built on utils/paths.py).

Data (``cfg.data_dir``)::

    train.csv  test.csv  sample_submission.csv  train_bounding_boxes.csv
    train_images/<uid>/<n>.dcm  test_images/<uid>/<n>.dcm  segmentations/<uid>.nii

Products::

    <prep>/studies.csv  <prep>/stage1_labels.csv  <prep>/volumes/<uid>.npy   utils/preprocess_data.py
    <output_dir>/rsna/stage2_labels_oof.csv                                  stage-1 OOF -> stage 2
    <test dir>/prep/volumes/<uid>.npy  <test dir>/stage2_labels_test.csv      test-time chain

``<prep>`` is ``<output_dir>/rsna/prep`` for the training data; a test-time run caches its
studies in its own test folder (utils/paths.test_dir).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from utils import paths
from utils.paths import Cfg


# ---- competition data ---------------------------------------------------------------------------
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
def studies_csv(prep: Path) -> Path:
    """One row per study: geometry, transfer syntaxes, reversed flag, skipped slices."""
    return Path(prep) / "studies.csv"


def stage1_labels_csv(prep: Path) -> Path:
    """One row per slice of a segmented study: C1..C7 ratios and the normalised C1-C7 box."""
    return Path(prep) / "stage1_labels.csv"


def parts_dir(prep: Path) -> Path:
    """Per-study results of preprocessing, written as each study finishes (resume unit)."""
    return Path(prep) / "parts"


def study_row_json(prep: Path, uid: str) -> Path:
    """A study's ``studies.csv`` row, written last: it marks the study as done."""
    return parts_dir(prep) / f"{uid}.json"


def study_labels_csv(prep: Path, uid: str) -> Path:
    """A segmented study's rows of ``stage1_labels.csv``."""
    return parts_dir(prep) / f"{uid}.labels.csv"


def volume_path(prep: Path, uid: str) -> Path:
    """Windowed uint8 volume (Z, S, S), head -> feet, memory-mappable."""
    return Path(prep) / "volumes" / f"{uid}.npy"


def test_prep_dir(cfg: Cfg) -> Path:
    """The volume cache of a test-time run (never the training cache)."""
    return paths.test_dir(cfg) / "prep"


# ---- localisation -------------------------------------------------------------------------------
def stage2_labels_csv(cfg: Cfg, split: str) -> Path:
    """Per (study, vertebra): slice range and crop box derived from stage-1 predictions."""
    if split == "oof":
        return paths.pipeline_dir(cfg) / "stage2_labels_oof.csv"
    if split == "test":
        return paths.test_dir(cfg) / "stage2_labels_test.csv"
    raise ValueError(f"split must be 'oof' or 'test', got {split!r}")


def priors_json(cfg: Cfg) -> Path:
    """Train-label prevalences saved by the CV report, for test folders without train.csv."""
    return paths.pipeline_dir(cfg) / "train_priors.json"


def calibration_json(cfg: Cfg) -> Path:
    """Per-target Platt parameters fitted on the OOF predictions by the CV report (test time applies them)."""
    return paths.pipeline_dir(cfg) / "calibration.json"


def patient_level_json(cfg: Cfg) -> Path:
    """Which patient level (head | noisy_or) the CV report chose for the test chain, and why."""
    return paths.pipeline_dir(cfg) / "patient_level.json"


def plausibility_json(cfg: Cfg) -> Path:
    """Per-vertebra reference of the OOF localisation (utils/rsna/postprocess.reference)."""
    return paths.pipeline_dir(cfg) / "plausibility.json"


# ---- the Kaggle notebook's folders ----------------------------------------------------------------
class Kaggle(NamedTuple):
    """A Kaggle notebook's folders under its root (:func:`kaggle`)."""

    root: Path  # /kaggle on Kaggle
    input: Path  # read-only inputs: competitions and attached datasets
    working: Path  # the writable output folder
    submission: Path  # the file a code competition scores

    def competition_candidates(self, slug: str) -> list[Path]:
        """Where Kaggle mounts competition ``slug``: ``input/<slug>`` (2022) or ``input/competitions/<slug>``."""
        return [self.input / slug, self.input / "competitions" / slug]


def kaggle(root: Path | None = None) -> Kaggle:
    """The folders of the Kaggle root ``root``; by default ``/kaggle``, or the folder the
    environment variable ``KAGGLE_ROOT`` names (tests)."""
    root = Path(root or os.environ.get(KAGGLE_ROOT_ENV) or "/kaggle")
    return Kaggle(root, root / "input", root / "working", root / "working" / "submission.csv")


def bundle_manifest(code: Path) -> Path:
    """``bundle.json`` of a code bundle (``make kaggle-bundle``): its runs folder, config and profile."""
    return Path(code) / "bundle.json"


KAGGLE_ROOT_ENV = "KAGGLE_ROOT"  # environment variable naming another input root (tests)


def oof_csv(cfg: Mapping[str, Any]) -> Path:
    """Final OOF predictions per case, as scored in the CV report."""
    return paths.pipeline_dir(cfg) / "oof_predictions.csv"


def calibration_png(cfg: Mapping[str, Any]) -> Path:
    return paths.pipeline_dir(cfg) / "cv_calibration.png"


def viz_dir(cfg: Mapping[str, Any], exp: str | None = None) -> Path:
    return paths.exp_dir(cfg, exp) / "viz"


def submission_csv(cfg: Mapping[str, Any]) -> Path:
    """Default submission path of a test-time run (``inference.py --out`` chooses another)."""
    return paths.test_dir(cfg) / "submission.csv"
