"""Trained stages as predictors: fold models from their run folders, streamed to a writer.

Used by inference.py (OOF and test predictions of any registered stage) and by a pipeline's
test-time chain. A registered dataset says what its predictions look like:

- ``key_columns``: the table columns that identify a row (written beside the outputs);
- ``output_columns(outputs) -> {column: (B,) array}``: model outputs of one batch as columns
  (default: each (B,) output as is, each (B, K) output as ``<name>_<k>``);
- ``make_writer(cfg, path, table)`` (optional): its own writer (e.g. one mask file per case)
  instead of the CSV writer; a writer is a context manager with ``write(rows, outputs)`` that
  publishes its output on a clean exit and nothing on an exception.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from utils import paths
from utils.checkpoint import load_checkpoint
from utils.config import CALL_KEYS, Config
from utils.engine import (
    batch_size_of,
    make_loader,
    prepare_model,
    resolve_device,
    stream_predictions,
)
from utils.io import atomic_path
from utils.registry import DATASETS, build_dataset, build_model
from utils.weights import without_pretrained

log = logging.getLogger(__name__)


def trained_folds(cfg: Config, exp: str | None = None) -> list[int]:
    """Folds of ``exp`` (default: the config's own) with an ``infer.checkpoint`` file on disk."""
    kind = cfg["infer"]["checkpoint"]
    return sorted(int(p.parent.name[4:]) for p in paths.exp_dir(cfg, exp).glob(f"fold*/{kind}.pth"))


def run_config(cfg: Config, exp: str | None = None) -> Config:
    """The resolved config ``exp`` was trained with, with the caller's ``CALL_KEYS`` (paths, device)."""
    exp = exp or cfg["exp_name"]
    folds = trained_folds(cfg, exp)
    if not folds:
        raise SystemExit(
            f"error: no trained fold of '{exp}' in {paths.exp_dir(cfg, exp)} "
            f"(looked for fold*/{cfg['infer']['checkpoint']}.pth); train it with train.py first"
        )
    saved = Config(
        load_checkpoint(paths.checkpoint_path(cfg, folds[0], cfg["infer"]["checkpoint"], exp))[
            "config"
        ]
    )
    return saved.replace(**{k: cfg.get(k) for k in CALL_KEYS})


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


# ---- writers ------------------------------------------------------------------------------------
def output_columns(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Default: each (B,) output as a column, each (B, K) output as ``<name>_<k>`` columns."""
    cols: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        if value.ndim == 1:
            cols[name] = value
        elif value.ndim == 2:
            cols.update({f"{name}_{k}": value[:, k] for k in range(value.shape[1])})
        else:
            raise ValueError(
                f"output '{name}' has shape {value.shape}: a dataset with per-pixel outputs "
                "needs its own make_writer"
            )
    return cols


def prediction_block(
    dataset_cls: Any, rows: pd.DataFrame, outputs: Mapping[str, np.ndarray]
) -> pd.DataFrame:
    """One batch as a table: the dataset's ``key_columns`` of ``rows``, then its output columns."""
    block = rows[list(dataset_cls.key_columns)].reset_index(drop=True)
    to_columns = getattr(dataset_cls, "output_columns", output_columns)
    for name, col in to_columns(outputs).items():
        block[name] = col
    return block


class CsvWriter:
    """Appends one CSV block per batch to a temporary file, published atomically on success.

    Use as a context manager: on an exception the temporary file is dropped, so a half-written
    prediction file is never left behind. Columns: the dataset's ``key_columns``, its output
    columns, then those of ``trailing`` that the rows carry (e.g. ``fold``).
    """

    def __init__(self, path: Path, dataset_cls: Any, trailing: Sequence[str] = ("fold",)):
        self.path = Path(path)
        self.dataset_cls = dataset_cls
        self.keys = list(dataset_cls.key_columns)
        self.trailing = list(trailing)
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None
        self._header = True

    def __enter__(self) -> CsvWriter:
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None and self._header:  # no batch at all: publish the header only
            pd.DataFrame(columns=self.keys).to_csv(self._tmp, index=False)
        return self._stack.__exit__(*exc)

    def write(self, rows: pd.DataFrame, outputs: Mapping[str, np.ndarray]) -> None:
        block = prediction_block(self.dataset_cls, rows, outputs)
        for name in self.trailing:
            if name in rows.columns:
                block[name] = rows[name].to_numpy()
        block.to_csv(self._tmp, mode="w" if self._header else "a", header=self._header, index=False)
        self._header = False


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


def make_writer(cfg: Config, path: Path, table: pd.DataFrame):
    """The dataset's own writer when it has one, else a :class:`CsvWriter` (a context manager)."""
    dataset_cls = DATASETS.get(cfg["dataset"]["name"])
    if hasattr(dataset_cls, "make_writer"):
        return dataset_cls.make_writer(cfg, path, table)
    return CsvWriter(path, dataset_cls)


def predict_frame(cfg: Config, models, table: pd.DataFrame, **dataset_extra: Any) -> pd.DataFrame:
    """Predictions on a table small enough for memory: key columns + output columns."""
    dataset_cls = DATASETS.get(cfg["dataset"]["name"])
    parts = [
        prediction_block(dataset_cls, rows, outputs)
        for rows, outputs in iter_predictions(cfg, list(models), table, **dataset_extra)
    ]
    if not parts:
        return table.reindex(columns=list(dataset_cls.key_columns)).iloc[:0]
    return pd.concat(parts, ignore_index=True)
