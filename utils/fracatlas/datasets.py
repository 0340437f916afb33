"""FracAtlas image dataset for the fracture classifiers (registered as ``fracatlas_images``).

Rows come from the conversion's ``cases.csv`` (the single-channel PNGs it wrote). Each sample is
the X-ray letterboxed to ``image_size`` (aspect kept, zero padding), optionally with the nnU-Net
fracture probability map as the last channel (``guide``): out-of-fold maps for the training
pool (each image's map comes from the nnU-Net model of its own fold, which never saw it), the
fold-ensemble maps on the test images. Training samples get albumentations augmentation, the
same geometry applied to the image and its map.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from scipy.special import expit, logit

from utils import paths
from utils.augment import augmentation
from utils.datasets import StageDataset
from utils.errors import InputError
from utils.fracatlas import layout
from utils.fracatlas.folds import read_cases, training_pool
from utils.fracatlas.images import letterbox
from utils.fracatlas.layout import ID
from utils.fracatlas.metric import ranking_metrics
from utils.fracatlas.preprocess import CASE, cases_csv
from utils.registry import DATASETS


def train_aug(strength: float) -> A.Compose:
    """Flips, a mild affine warp (the map follows, linearly interpolated) and intensity changes."""
    return augmentation(
        strength,
        rotate=15,
        translate=0.05,
        contrast=0.2,
        noise=0.04,
        p_affine=0.8,
        linear_mask=True,
    )


def _with_files(cfg, table: pd.DataFrame, split: str, guide: bool) -> pd.DataFrame:
    """``table`` plus absolute ``png`` paths and, with ``guide``, the ``map`` of ``split``."""
    raw = paths.nnunet_raw_dataset(cfg)
    table = table.assign(png=[str(raw / p) for p in table["image"]])
    if guide:
        maps = layout.seg_maps(cfg, split)
        table = table.assign(map=[str(maps / f"{c}.png") for c in table[CASE]])
        absent = [m for m in table["map"] if not Path(m).is_file()]
        if absent:
            raise InputError(
                f"{len(absent)} nnU-Net maps missing (e.g. {absent[0]}); run "
                f"python -m utils.fracatlas.segment --CFG config/fracatlas/base.yaml {split} first"
            )
    return table


@DATASETS.register("fracatlas_images")
class FractureImages(StageDataset):
    """One image per row: ``image`` (in_chans, S, S) float32, ``fractured`` () float32 0/1.

    The grayscale X-ray (scaled to [-1, 1]) fills ``in_chans`` channels, or ``in_chans - 1``
    with ``guide``, whose last channel is the nnU-Net fracture probability in [0, 1].
    """

    key_columns = (ID, CASE, "fractured")
    ensemble_output = (
        "logits"  # written as ``prob``; ensembles average the logits (utils/ensemble.py)
    )
    label_column = "fractured"

    def __init__(
        self,
        table: pd.DataFrame,
        cfg: Mapping[str, Any],
        train: bool,
        image_size: int = 512,
        in_chans: int = 1,
        guide: bool = False,
        aug: float = 1.0,
    ):
        if in_chans < 1 + int(guide):
            raise ValueError(f"in_chans={in_chans} leaves no image channel with guide={guide}")
        super().__init__(table, cfg, train)
        self.size, self.in_chans, self.guide = int(image_size), int(in_chans), bool(guide)
        self.transform = train_aug(aug) if train and aug else None

    @staticmethod
    def load_table(cfg) -> pd.DataFrame:
        """The training pool of ``cases.csv`` (the fold file splits it)."""
        guide = bool(cfg["dataset"]["params"].get("guide", False))
        return _with_files(cfg, training_pool(cfg), "oof", guide)

    @staticmethod
    def oof_inputs(cfg) -> list[Path]:
        inputs = [cases_csv(paths.nnunet_raw_dataset(cfg))]
        if cfg["dataset"]["params"].get("guide", False):
            inputs.append(layout.seg_summary(cfg, "oof"))
        return inputs

    @staticmethod
    def test_table(cfg) -> pd.DataFrame:
        """The held-out test images of ``cases.csv`` (official test split + test negatives)."""
        cases = read_cases(cfg)
        test = cases[cases["split"] == "test"].reset_index(drop=True)
        return _with_files(cfg, test, "test", bool(cfg["dataset"]["params"].get("guide", False)))

    @staticmethod
    def output_columns(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``prob``: the fracture probability (float64)."""
        return {"prob": expit(out["logits"].astype(np.float64))}

    @classmethod
    def ensemble_logits(cls, preds: pd.DataFrame) -> np.ndarray:
        """The logits back from ``prob``; a probability rounded to 0 or 1 gives +-36 (float64's
        sigmoid saturates there), not an infinity."""
        eps = np.finfo(np.float64).eps / 2
        return logit(preds["prob"].to_numpy(np.float64).clip(eps, 1 - eps))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.table.iloc[index]
        img = letterbox(cv2.imread(row["png"], cv2.IMREAD_GRAYSCALE), self.size)
        fmap = None
        if self.guide:
            raw = cv2.imread(row["map"], cv2.IMREAD_GRAYSCALE)
            fmap = letterbox(raw.astype(np.float32) / 255.0, self.size)
        if self.transform is not None:
            self.transform.set_random_seed(int(self.rng(index).integers(2**31)))
            out = self.transform(image=img, **({"mask": fmap} if fmap is not None else {}))
            img, fmap = out["image"], out.get("mask")
        x = img.astype(np.float32) / 127.5 - 1.0
        channels = [x] * (self.in_chans - int(self.guide)) + ([fmap] if self.guide else [])
        image = torch.from_numpy(np.ascontiguousarray(np.stack(channels)))
        return {"image": image, "fractured": torch.tensor(float(row["fractured"]))}

    @staticmethod
    def evaluate(out: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
        """Validation ROC-AUC and average precision (threshold-free)."""
        probs = 1 / (1 + np.exp(-out["logits"].astype(np.float64)))
        return ranking_metrics(table["fractured"].to_numpy(), probs)
