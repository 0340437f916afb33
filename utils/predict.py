"""Fold models and per-stage predictors used by inference.py (OOF and test)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

from models import build_model
from utils import paths
from utils.checkpoint import load_checkpoint
from utils.config import Config
from utils.datasets import (
    VERTEBRAE,
    StudyLogits,
    VertebraSequences,
    VertebraSlices,
    study_logit_table,
)
from utils.engine import make_loader, mean_outputs, predict, prepare_model, resolve_device
from utils.preprocess_data import BOX_COLS

log = logging.getLogger(__name__)
# What each stage predicts is decided by its dataset (the thing that defines its samples).
STAGE_KIND = {"vertebra_slices": "stage1", "vertebra_sequences": "stage2", "study_logits": "head"}
# Keys of the calling config that override a stage's saved run config at prediction time
# (where the data and runs are, and how to run); everything else stays as the stage was trained.
_RUNTIME = ("data_dir", "output_dir", "device", "progress")


def stage_kind(cfg: Config) -> str:
    name = cfg["dataset"]["name"]
    if name not in STAGE_KIND:
        raise ValueError(f"dataset '{name}' has no predictor; known: {sorted(STAGE_KIND)}")
    return STAGE_KIND[name]


def trained_folds(cfg: Config, exp: str) -> list[int]:
    """Folds of ``exp`` with the checkpoint ``infer.checkpoint`` (best | last) on disk."""
    root = paths.exp_dir(cfg, exp)
    kind = cfg["infer"]["checkpoint"]
    folds = sorted(int(p.parent.name[4:]) for p in root.glob(f"fold*/{kind}.pth"))
    return folds


def is_fresh(product, cfg: Config, exp: str) -> bool:
    """True when ``product`` exists and is newer than every checkpoint of ``exp`` it was made from."""
    kind = cfg["infer"]["checkpoint"]
    ckpts = list(paths.exp_dir(cfg, exp).glob(f"fold*/{kind}.pth"))
    return (
        product.is_file()
        and bool(ckpts)
        and product.stat().st_mtime > max(p.stat().st_mtime for p in ckpts)
    )


def run_config(cfg: Config, exp: str) -> Config:
    """The resolved config ``exp`` was trained with, with this call's runtime keys (paths, device)."""
    folds = trained_folds(cfg, exp)
    if not folds:
        raise SystemExit(
            f"error: no trained fold of '{exp}' in {paths.exp_dir(cfg, exp)} "
            f"(looked for fold*/{cfg['infer']['checkpoint']}.pth); train it with train.py first"
        )
    saved = load_checkpoint(paths.checkpoint_path(cfg, folds[0], cfg["infer"]["checkpoint"], exp))[
        "config"
    ]
    saved.update({k: cfg[k] for k in _RUNTIME})
    saved["infer"]["checkpoint"] = cfg["infer"]["checkpoint"]
    return Config(saved)


def load_models(cfg: Config, folds: Iterable[int] | None = None) -> dict[int, torch.nn.Module]:
    """fold -> model in eval mode, from ``infer.checkpoint`` of each trained fold of ``cfg.exp_name``."""
    device = resolve_device(cfg["device"])
    models = {}
    for fold in folds if folds is not None else trained_folds(cfg, cfg["exp_name"]):
        state = load_checkpoint(paths.checkpoint_path(cfg, fold, cfg["infer"]["checkpoint"]))
        model = build_model(state["config"])
        model.load_state_dict(state["model"])
        models[fold] = prepare_model(model, cfg, device).eval()
    return models


def _ensemble(cfg: Config, models: Iterable[torch.nn.Module], ds) -> dict[str, np.ndarray]:
    device = resolve_device(cfg["device"])
    loader = make_loader(cfg, ds, train=False)
    return mean_outputs([predict(cfg, m, loader, device, desc=cfg["exp_name"])[0] for m in models])


# ---- stage 1 ------------------------------------------------------------------------------------
def slice_table(cfg: Config, uids: Iterable[str]) -> pd.DataFrame:
    """Every slice of each cached study: StudyInstanceUID, slice."""
    prep = paths.prep_dir(cfg)
    parts = []
    for uid in uids:
        n = np.load(paths.volume_path(prep, uid), mmap_mode="r").shape[0]
        parts.append(pd.DataFrame({"StudyInstanceUID": uid, "slice": np.arange(n)}))
    return (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["StudyInstanceUID", "slice"])
    )


def predict_stage1(
    cfg: Config, models: Iterable[torch.nn.Module], uids: Iterable[str]
) -> pd.DataFrame:
    """Per-slice box and C1..C7 ratios (fold-ensemble mean) for the studies ``uids``."""
    table = slice_table(cfg, uids)
    if table.empty:
        return table.reindex(columns=[*table.columns, *BOX_COLS, *VERTEBRAE])
    ds = VertebraSlices(table, cfg, train=False, **{**cfg["dataset"]["params"], "aug": 0.0})
    out = _ensemble(cfg, models, ds)
    table[BOX_COLS] = out["box"]
    table[VERTEBRAE] = out["ratios"]
    return table


# ---- stage 2 ------------------------------------------------------------------------------------
def predict_stage2(
    cfg: Config, models: Iterable[torch.nn.Module], table: pd.DataFrame
) -> pd.DataFrame:
    """Per (study, vertebra) fracture logit (fold-ensemble mean of logits) for a stage-2 table."""
    table = table[["StudyInstanceUID", "vertebra", "start", "end", *BOX_COLS]].reset_index(
        drop=True
    )
    if table.empty:
        return table.assign(logit=pd.Series(dtype=float))
    ds = VertebraSequences(table, cfg, train=False, **{**cfg["dataset"]["params"], "aug": 0.0})
    table["logit"] = _ensemble(cfg, models, ds)["logit"]
    return table


# ---- patient head -------------------------------------------------------------------------------
def predict_head(
    cfg: Config,
    models: Iterable[torch.nn.Module],
    stage2: pd.DataFrame,
    uids: Iterable[str],
    priors: dict[str, float],
) -> pd.DataFrame:
    """Wide probabilities (StudyInstanceUID, patient_overall, C1..C7) for every study in ``uids``.

    Studies or vertebrae without a stage-2 prediction enter the head as 'missing' with prior logits.
    """
    table = study_logit_table(stage2, priors, uids)
    out = _ensemble(cfg, models, StudyLogits(table, cfg, train=False))
    probs = 1 / (1 + np.exp(-out["logits"].astype(np.float64)))
    return pd.DataFrame(probs, columns=["patient_overall", *VERTEBRAE]).assign(
        StudyInstanceUID=table["StudyInstanceUID"].to_numpy()
    )[["StudyInstanceUID", "patient_overall", *VERTEBRAE]]
