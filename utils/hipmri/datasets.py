"""HipMRI slice dataset (registered as ``hipmri_slices``) and its NIfTI mask writer.

Each sample is read from its NIfTI file when it is asked for (nothing is held for the whole
set): per-slice z-score, centre crop/pad to ``image_size``, albumentations augmentation on
training samples. Predictions are written back as one mask file per slice, in the input's shape
and affine (:class:`MaskWriter`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import nibabel as nib
import numpy as np
import pandas as pd
import torch

from utils import paths
from utils.augment import augmentation
from utils.datasets import StageDataset
from utils.hipmri import layout
from utils.hipmri.folds import training_slices
from utils.hipmri.metric import CLASSES, dice_counts, dice_from_counts, dice_summary
from utils.hipmri.preprocess import slices_csv
from utils.hipmri.slices import fit, normalise, plane_shape, read_image, read_mask, unfit
from utils.io import write_csv
from utils.registry import DATASETS

log = logging.getLogger(__name__)
N_CLASSES = len(CLASSES)


def train_aug(strength: float) -> A.Compose:
    """Small affine warps (mask: nearest) and intensity changes, no flip. Slice edges are
    background: they are replicated (0 is the mean of a z-scored slice)."""
    return augmentation(
        strength,
        rotate=10,
        translate=0.05,
        contrast=0.2,
        noise=0.05,
        flip=False,
        replicate_border=True,
    )


@DATASETS.register("hipmri_slices")
class HipSlices(StageDataset):
    """One slice per row: ``image`` (1, H, W) float32 z-scored, ``mask`` (H, W) int64 (when known).

    ``(H, W)`` is ``image_size``: slices are centre-cropped or padded to it (padding takes the
    slice's darkest value, i.e. background). ``mask`` is present when every row of the table has
    one (training, validation); test tables give the image only.
    """

    key_columns = (layout.ID,)

    def __init__(
        self,
        table: pd.DataFrame,
        cfg: Mapping[str, Any],
        train: bool,
        image_size: Sequence[int] = (256, 128),
        aug: float = 1.0,
    ):
        super().__init__(table, cfg, train)
        self.size = (int(image_size[0]), int(image_size[1]))
        self.has_masks = "mask" in self.table and bool((self.table["mask"] != "").all())
        self.transform = train_aug(aug) if train and aug else None

    @staticmethod
    def load_table(cfg) -> pd.DataFrame:
        """Train + validate slices of ``prep/slices.csv`` (the fold file splits them)."""
        return training_slices(cfg)

    @staticmethod
    def oof_inputs(cfg) -> list[Path]:
        return [slices_csv(cfg)]

    @staticmethod
    def test_table(cfg) -> pd.DataFrame:
        """Every test image of ``cfg.data_dir`` (keras_slices_test/), with its mask when present."""
        return layout.pair_split(paths.data_dir(cfg), "test", masks_optional=True)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.table.iloc[index]
        img = normalise(read_image(row["image"]))
        img = fit(img, self.size, fill=float(img.min()))
        mask = fit(read_mask(row["mask"], N_CLASSES), self.size, fill=0) if self.has_masks else None
        if self.transform is not None:
            self.transform.set_random_seed(int(self.rng(index).integers(2**31)))
            out = self.transform(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        sample = {"image": torch.from_numpy(np.ascontiguousarray(img))[None]}
        if mask is not None:
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()
        return sample

    @staticmethod
    def evaluate(out: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
        """Per-class Dice (pooled over the slices, on the network's crop) from ``logits`` (N, 6, H, W)."""
        pred = out["logits"].argmax(axis=1)
        counts = np.zeros((N_CLASSES, 3), np.int64)
        for i, mask_path in enumerate(table["mask"]):
            truth = fit(read_mask(mask_path, N_CLASSES), pred.shape[1:], fill=0)
            counts += dice_counts(pred[i], truth)
        return dice_summary(dice_from_counts(counts))

    @staticmethod
    def make_writer(cfg, path: Path, table: pd.DataFrame) -> MaskWriter:
        """Masks into ``path`` (a folder), or beside ``path`` when it is a CSV (OOF)."""
        path = Path(path)
        if path.suffix == ".csv":
            return MaskWriter(path.with_suffix(""), path)
        return MaskWriter(path, path / "slices.csv")


class MaskWriter:
    """Writes one ``seg_*.nii.gz`` label mask per predicted slice, plus a per-slice index CSV.

    Each mask has its input image's shape (including a trailing singleton axis) and affine,
    uint8 labels 0..5. Slices whose row has a ``mask`` are scored against it: per-slice Dice in
    the index, pooled counts in ``counts`` (6, 3). Masks go to a hidden temporary folder next to
    ``folder``, which replaces ``folder`` only on a clean exit; on an exception it is removed.
    """

    def __init__(self, folder: Path, index_csv: Path):
        self.folder, self.index_csv = Path(folder), Path(index_csv)
        self.counts = np.zeros((N_CLASSES, 3), np.int64)
        self.n_scored = 0
        self.rows: list[dict[str, Any]] = []
        self._tmp: Path | None = None

    def __enter__(self) -> MaskWriter:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))
        return self

    def write(self, rows: pd.DataFrame, outputs: Mapping[str, np.ndarray]) -> None:
        labels = outputs["logits"].argmax(axis=1).astype(np.uint8)  # (B, h, w)
        for row, pred in zip(rows.itertuples(index=False), labels, strict=True):
            src = nib.load(row.image)
            shape = src.shape
            full = unfit(pred, plane_shape(shape, row.image)).reshape(shape)
            name = layout.mask_name_of(Path(row.image).name)
            nib.save(nib.Nifti1Image(full, src.affine), self._tmp / name)
            entry: dict[str, Any] = {layout.ID: getattr(row, layout.ID), "mask_file": name}
            if hasattr(row, "fold"):  # OOF: which fold model predicted the slice
                entry["fold"] = row.fold
            if getattr(row, "mask", ""):
                counts = dice_counts(full.reshape(shape[:2]), read_mask(row.mask, N_CLASSES))
                self.counts += counts
                self.n_scored += 1
                entry.update(
                    {f"dice_{c}": d for c, d in zip(CLASSES, dice_from_counts(counts), strict=True)}
                )
            self.rows.append(entry)

    def __exit__(self, exc_type, exc, tb) -> bool:
        tmp, self._tmp = self._tmp, None
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        old = None
        if self.folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.old.", dir=self.folder.parent))
            os.replace(self.folder, old / self.folder.name)
        os.replace(tmp, self.folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        write_csv(pd.DataFrame(self.rows, columns=self._columns()), self.index_csv)
        log.info("wrote %d masks to %s", len(self.rows), self.folder)
        return False

    def _columns(self) -> list[str]:
        scored = [f"dice_{c}" for c in CLASSES] if self.n_scored else []
        folds = ["fold"] if self.rows and "fold" in self.rows[0] else []
        return [layout.ID, "mask_file", *folds, *scored]
