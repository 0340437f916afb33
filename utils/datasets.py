"""The stage contract: what a registered dataset tells train.py, inference.py and utils/predict.py.

Every dataset in ``utils.registry.DATASETS`` derives from :class:`StageDataset`, so the generic
entry points call its methods without probing what it has. A stage overrides what differs:

- ``load_table(cfg)`` (required): every training row, with the pipeline's id column; train.py
  splits it with the fold file;
- ``evaluate(outputs, table)`` (required): validation metrics on concatenated model outputs;
- ``__getitem__(index) -> dict`` of tensors (required) and ``__init__(table, cfg, train, **params)``;
- ``key_columns`` (required): the table columns that identify a prediction row;
- ``oof_table(cfg)``: the rows inference.py predicts out of fold (default: ``load_table``);
- ``oof_inputs(cfg)``: the files those rows come from; a newer one invalidates the OOF file
  (default: none);
- ``test_table(cfg)``: the rows of a test-time run on ``cfg.data_dir`` (default: the stage has
  none, an error);
- ``output_columns(outputs)``: one batch's outputs as named columns (default: each (B,) output
  as is, each (B, K) output as ``<name>_<k>``);
- ``make_writer(cfg, path, table)``: where predictions go (default: :class:`CsvWriter`, key
  columns + output columns); a writer is a context manager with ``write(rows, outputs)`` that
  publishes on a clean exit and nothing on an exception;
- ``ensemble_output``, ``label_column``, ``ensemble_logits(preds)``: what an ensemble of
  experiments of this stage averages (utils/ensemble.py): the model output, one logit per row,
  read back from a prediction table, and the label the weights are fitted to (default: none, the
  stage cannot be ensembled).

Random draws (augmentation) come from ``rng(index)``, seeded by (seed, epoch, row): train.py calls
``set_epoch`` before each epoch, so a resumed run, any number of loader workers and any process
count draw exactly what an uninterrupted single-process run draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from utils.errors import InputError
from utils.io import atomic_path


class StageDataset(Dataset):
    """Base of every registered dataset: the rows of ``table`` and the stage contract above."""

    key_columns: ClassVar[tuple[str, ...]] = ()
    ensemble_output: ClassVar[str | None] = (
        None  # the model output (B,) of logits ensembles average
    )
    label_column: ClassVar[str | None] = None  # the 0/1 label of load_table's rows it predicts

    def __init__(self, table: pd.DataFrame, cfg: Mapping[str, Any], train: bool):
        self.table = table.reset_index(drop=True)
        self.seed = int(cfg["seed"])
        self.train = bool(train)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.table)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of row ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    # ---- tables ---------------------------------------------------------------------------------
    @classmethod
    def load_table(cls, cfg) -> pd.DataFrame:
        raise NotImplementedError(f"{cls.__name__} must define load_table(cfg)")

    @classmethod
    def oof_table(cls, cfg) -> pd.DataFrame:
        return cls.load_table(cfg)

    @classmethod
    def oof_inputs(cls, cfg) -> list[Path]:
        return []

    @classmethod
    def test_table(cls, cfg) -> pd.DataFrame:
        raise InputError(
            f"dataset {cls.__name__} has no test rows and pipeline '{cfg['pipeline']}' no "
            "test-time chain: predict this stage out of fold (--split oof)"
        )

    # ---- predictions ----------------------------------------------------------------------------
    @staticmethod
    def evaluate(outputs: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
        raise NotImplementedError("a stage dataset must define evaluate(outputs, table)")

    @staticmethod
    def output_columns(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each (B,) output as a column, each (B, K) output as ``<name>_<k>`` columns."""
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

    @classmethod
    def prediction_block(
        cls, rows: pd.DataFrame, outputs: Mapping[str, np.ndarray]
    ) -> pd.DataFrame:
        """One batch as a table: ``key_columns`` of ``rows``, then the output columns."""
        block = rows[list(cls.key_columns)].reset_index(drop=True)
        for name, col in cls.output_columns(outputs).items():
            block[name] = col
        return block

    @classmethod
    def ensemble_logits(cls, preds: pd.DataFrame) -> np.ndarray:
        """``ensemble_output`` (N,) float64 read back from a prediction table (the inverse of
        ``output_columns`` for it); default: the column of that name."""
        return preds[cls.ensemble_output].to_numpy(np.float64)

    @classmethod
    def make_writer(cls, cfg, path: Path, table: pd.DataFrame) -> CsvWriter:
        return CsvWriter(path, cls)


class CsvWriter:
    """Appends one CSV block per batch to a temporary file, published atomically on success.

    Use as a context manager: on an exception the temporary file is dropped, so a half-written
    prediction file is never left behind. Columns: the dataset's ``key_columns``, its output
    columns, then those of ``trailing`` that the rows carry (e.g. ``fold``).
    """

    def __init__(
        self, path: Path, dataset_cls: type[StageDataset], trailing: Sequence[str] = ("fold",)
    ):
        self.path = Path(path)
        self.dataset_cls = dataset_cls
        self.trailing = list(trailing)
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None
        self._header = True

    def __enter__(self) -> CsvWriter:
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None and self._header:  # no batch at all: publish the header only
            pd.DataFrame(columns=list(self.dataset_cls.key_columns)).to_csv(self._tmp, index=False)
        return self._stack.__exit__(*exc)

    def write(self, rows: pd.DataFrame, outputs: Mapping[str, np.ndarray]) -> None:
        block = self.dataset_cls.prediction_block(rows, outputs)
        for name in self.trailing:
            if name in rows.columns:
                block[name] = rows[name].to_numpy()
        block.to_csv(self._tmp, mode="w" if self._header else "a", header=self._header, index=False)
        self._header = False
