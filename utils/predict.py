"""Trained stages as predictors: fold models from their run folders, streamed to a writer.

Used by inference.py (OOF and test predictions of any registered stage) and by a pipeline's
test-time chain. What a prediction row holds and where it is written is the stage dataset's
part of the contract (utils/datasets.py: ``key_columns``, ``output_columns``, ``make_writer``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from utils import paths
from utils.checkpoint import load_checkpoint
from utils.config import Config, runtime_keys, thaw, with_runtime_keys
from utils.engine import (
    batch_size_of,
    make_loader,
    prepare_model,
    resolve_device,
    stream_predictions,
)
from utils.errors import InputError
from utils.registry import DATASETS, build_dataset, build_model
from utils.weights import without_pretrained

log = logging.getLogger(__name__)


def trained_folds(cfg: Config, exp: str | None = None) -> list[int]:
    """Folds of ``exp`` (default: the config's own) with an ``infer.checkpoint`` file on disk."""
    kind = cfg["infer"]["checkpoint"]
    return sorted(int(p.parent.name[4:]) for p in paths.exp_dir(cfg, exp).glob(f"fold*/{kind}.pth"))


def run_config(cfg: Config, exp: str | None = None) -> Config:
    """The resolved config ``exp`` was trained with, with the caller's runtime keys.

    Always the ``call`` keys (where data, runs and devices are: utils/config.runtime_keys); for the
    caller's own stage (``exp`` None or its exp_name) its ``run`` keys too, so an override of a
    report or post-processing key on the command line applies. An upstream stage keeps the
    ``run`` keys it was trained with.
    """
    exp = exp or cfg["exp_name"]
    scopes = ("call", "run") if exp == cfg["exp_name"] else ("call",)
    folds = trained_folds(cfg, exp)
    if not folds:
        raise InputError(
            f"no trained fold of '{exp}' in {paths.exp_dir(cfg, exp)} "
            f"(looked for fold*/{cfg['infer']['checkpoint']}.pth); train it with train.py first"
        )
    saved = Config(
        load_checkpoint(paths.checkpoint_path(cfg, folds[0], cfg["infer"]["checkpoint"], exp))[
            "config"
        ]
    )
    keys = [k for scope in scopes for k in runtime_keys(cfg, scope)]
    return with_runtime_keys(saved, {k: thaw(cfg.get(k)) for k in keys})


def load_models(cfg: Config, folds: Iterable[int] | None = None) -> dict[int, torch.nn.Module]:
    """fold -> model in eval mode, from ``infer.checkpoint`` of each trained fold of the run."""
    device = resolve_device(cfg["device"])
    models = {}
    for fold in folds if folds is not None else trained_folds(cfg):
        state = load_checkpoint(paths.checkpoint_path(cfg, fold, cfg["infer"]["checkpoint"]))
        # The state dict replaces every weight: no pretrained download (Kaggle runs offline).
        model = build_model(Config(without_pretrained(state["config"])))
        model.load_state_dict(state["model"])
        models[fold] = prepare_model(model, cfg, device).eval()
    return models


def is_fresh(product: Path, cfg: Config, inputs: Sequence[Path] = ()) -> bool:
    """True when ``product`` is newer than every checkpoint of the run and every input file."""
    kind = cfg["infer"]["checkpoint"]
    sources = [*paths.exp_dir(cfg).glob(f"fold*/{kind}.pth"), *map(Path, inputs)]
    return (
        product.is_file()
        and bool(sources)
        and all(p.is_file() for p in sources)
        and product.stat().st_mtime > max(p.stat().st_mtime for p in sources)
    )


# ---- files -------------------------------------------------------------------------------------
def read_predictions(path: Path, id_col: str) -> pd.DataFrame:
    """A predictions CSV with the case ids read as strings."""
    return pd.read_csv(path, dtype={id_col: str}, keep_default_na=False)


# ---- prediction ---------------------------------------------------------------------------------
def iter_predictions(
    cfg: Config, models: Sequence[torch.nn.Module], table: pd.DataFrame, **dataset_extra: Any
) -> Iterator[tuple[pd.DataFrame, dict[str, np.ndarray]]]:
    """``(rows, outputs)`` per batch for the rows of ``table``, outputs averaged over ``models``."""
    table = table.reset_index(drop=True)
    if table.empty:
        return
    ds = build_dataset(cfg, table, train=False, **dataset_extra)
    device = resolve_device(cfg["device"])
    start = 0
    loader = make_loader(cfg, ds, train=False)
    for batch, outputs in stream_predictions(cfg, models, loader, device, desc=cfg["exp_name"]):
        n = batch_size_of(batch)
        yield table.iloc[start : start + n], outputs
        start += n


def predict_to(writer, cfg: Config, models, table: pd.DataFrame, **dataset_extra: Any) -> None:
    """Stream the predictions of ``models`` on ``table`` into ``writer`` (no close)."""
    for rows, outputs in iter_predictions(cfg, list(models), table, **dataset_extra):
        writer.write(rows, outputs)


def predict_frame(cfg: Config, models, table: pd.DataFrame, **dataset_extra: Any) -> pd.DataFrame:
    """Predictions on a table small enough for memory: key columns + output columns."""
    dataset_cls = DATASETS.get(cfg["dataset"]["name"])
    parts = [
        dataset_cls.prediction_block(rows, outputs)
        for rows, outputs in iter_predictions(cfg, list(models), table, **dataset_extra)
    ]
    if not parts:
        return table.reindex(columns=list(dataset_cls.key_columns)).iloc[:0]
    return pd.concat(parts, ignore_index=True)
