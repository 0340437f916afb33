"""Every product path of every pipeline is built here (a data set's own layout: utils/<pipeline>/layout.py).

Products live under ``<output_dir>/<pipeline>/`` so that pipelines never overwrite each other::

    prep/...                                   the pipeline's conversion / cache (utils/preprocess_data.py)
    folds.csv                                  the one fold file of the pipeline (utils/fold_split.py)
    <exp>/fold<k>/{config.yaml,train.log,metrics.csv,curves.png,last.pth,best.pth}   train.py
    <exp>/preds_oof.csv  <exp>/viz/*.png       inference.py --split oof
    cv_report.{md,json}  cv_calibration.png  oof_predictions.csv                     inference.py
    experiments.csv                            one row per finished fold and per CV report (utils/experiments.py)
    <ensemble>/{ensemble.json,preds_oof.csv}   an ensemble of experiments (utils/ensemble.py)
    test/<data>-<hash>/...                     inference.py --split test: intermediates of one test
                                               data folder (cache, per-stage predictions, submission.csv)
    nnunet/{raw,preprocessed,results}/         nnU-Net v2's three roots (utils/nnunet.py exports them)
    predictions/<name>/                        one prediction run of an nnU-Net pipeline (masks + CSVs)

A test-time run therefore never writes into the training run's products, whatever folder it reads.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.config import ConfigError

Cfg = Mapping[str, Any]


def pipeline_dir(cfg: Cfg) -> Path:
    """``<output_dir>/<pipeline>``: the root of one pipeline's products."""
    if not cfg["pipeline"]:
        raise ConfigError("config has no pipeline: load a stage file under config/<pipeline>/")
    return Path(cfg["output_dir"]) / cfg["pipeline"]


def data_dir(cfg: Cfg) -> Path:
    if not cfg["data_dir"]:
        raise ConfigError("data_dir is not set (data_dir=PATH)")
    return Path(cfg["data_dir"])


def prep_dir(cfg: Cfg) -> Path:
    return pipeline_dir(cfg) / "prep"


def folds_csv(cfg: Cfg) -> Path:
    """The one fold file every stage of the pipeline reads (id column, fold)."""
    return pipeline_dir(cfg) / "folds.csv"


# ---- runs ---------------------------------------------------------------------------------------
def exp_dir(cfg: Cfg, exp: str | None = None) -> Path:
    return pipeline_dir(cfg) / (exp or cfg["exp_name"])


def run_dir(cfg: Cfg, fold: int, exp: str | None = None) -> Path:
    return exp_dir(cfg, exp) / f"fold{fold}"


def checkpoint_path(cfg: Cfg, fold: int, kind: str = "best", exp: str | None = None) -> Path:
    if kind not in ("best", "last"):
        raise ValueError(f"checkpoint kind must be 'best' or 'last', got {kind!r}")
    return run_dir(cfg, fold, exp) / f"{kind}.pth"


def preds_csv(cfg: Cfg, exp: str | None = None) -> Path:
    """Out-of-fold predictions of one stage on the training data."""
    return exp_dir(cfg, exp) / "preds_oof.csv"


def ensemble_json(cfg: Cfg, exp: str | None = None) -> Path:
    """An ensemble's record: its members, the weights in use and the fit (utils/ensemble.py)."""
    return exp_dir(cfg, exp) / "ensemble.json"


def experiments_csv(cfg: Cfg) -> Path:
    """The experiment log of a pipeline: one row per finished fold and per CV report."""
    return pipeline_dir(cfg) / "experiments.csv"


# ---- cross-validation report --------------------------------------------------------------------
def cv_report(cfg: Cfg, suffix: str) -> Path:
    """``cv_report.md`` / ``cv_report.json``."""
    return pipeline_dir(cfg) / f"cv_report.{suffix}"


# ---- nnU-Net v2 ---------------------------------------------------------------------------------
NNUNET_ROOTS = ("raw", "preprocessed", "results")


def nnunet_root(cfg: Cfg, kind: str) -> Path:
    """nnU-Net's ``raw`` / ``preprocessed`` / ``results`` folder of this pipeline."""
    if kind not in NNUNET_ROOTS:
        raise ValueError(f"nnU-Net root must be one of {NNUNET_ROOTS}, got {kind!r}")
    return pipeline_dir(cfg) / "nnunet" / kind


def nnunet_dataset(cfg: Cfg) -> str:
    """``Dataset<id>_<name>``: the dataset folder name under each nnU-Net root."""
    nn = cfg["nnunet"]
    if nn["dataset_id"] is None or not nn["dataset_name"]:
        raise ConfigError("nnunet.dataset_id and nnunet.dataset_name must be set")
    return f"Dataset{int(nn['dataset_id']):03d}_{nn['dataset_name']}"


def nnunet_raw_dataset(cfg: Cfg) -> Path:
    """The raw dataset folder (dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)."""
    return nnunet_root(cfg, "raw") / nnunet_dataset(cfg)


def nnunet_splits(cfg: Cfg) -> Path:
    """``splits_final.json`` where nnUNetv2_train reads it (written from the pipeline's fold file)."""
    return nnunet_root(cfg, "preprocessed") / nnunet_dataset(cfg) / "splits_final.json"


def nnunet_model_dir(cfg: Cfg, trainer: str | None = None) -> Path:
    """``results/Dataset…/<trainer>__<plans>__<configuration>/`` (holds fold_<k>/)."""
    nn = cfg["nnunet"]
    name = f"{trainer or nn['trainer']}__{nn['plans']}__{nn['configuration']}"
    return nnunet_root(cfg, "results") / nnunet_dataset(cfg) / name


# ---- test time ----------------------------------------------------------------------------------
def test_dir(cfg: Cfg) -> Path:
    """Intermediates of a test-time run on ``cfg.data_dir``: one folder per data folder.

    Named after the folder plus a hash of its absolute path, so two test sets never share a
    cache and neither touches the training products.
    """
    data = data_dir(cfg).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", data.name) or "data"
    digest = hashlib.sha1(str(data).encode()).hexdigest()[:8]
    return pipeline_dir(cfg) / "test" / f"{slug}-{digest}"


def test_preds_csv(cfg: Cfg, exp: str | None = None) -> Path:
    """Fold-ensemble predictions of one stage on the test data of ``cfg.data_dir``."""
    return test_dir(cfg) / f"{exp or cfg['exp_name']}_preds.csv"
