"""RSNA 2022 datasets (registered in ``utils.registry.DATASETS``), read from the uint8 volume cache.

Stage 1 (``vertebra_slices``), stage 2 (``vertebra_sequences``) and the patient head
(``study_logits``); each follows the stage contract of utils/datasets.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from utils import paths
from utils.augment import augmentation
from utils.datasets import StageDataset
from utils.errors import InputError
from utils.registry import DATASETS
from utils.rsna import layout
from utils.rsna.metric import TARGETS, UID, VERTEBRAE, score
from utils.rsna.preprocess import BOX_COLS


@lru_cache(maxsize=64)
def _volume(path: str) -> np.ndarray:
    """Memory-mapped (Z, S, S) uint8 volume; cached per process (each worker maps its own)."""
    return np.load(path, mmap_mode="r")


def stack_slices(
    vol: np.ndarray,
    centre: int,
    in_chans: int,
    step: int,
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> np.ndarray:
    """(H, W, in_chans) uint8: slices ``centre + (k - in_chans // 2) * step``, clamped to the volume.

    ``rows`` / ``cols`` select a region before anything is copied (a crop of a memory-mapped
    volume reads only that region).
    """
    idx = np.clip(centre + (np.arange(in_chans) - in_chans // 2) * step, 0, len(vol) - 1)
    return np.ascontiguousarray(np.moveaxis(vol[idx, rows, cols], 0, -1))


def box_region(box: np.ndarray, h: int, w: int) -> tuple[slice, slice]:
    """Pixel (rows, cols) of a normalised x0, y0, x1, y1 box on an (h, w) slice, at least 1 px."""
    x0, x1 = int(np.floor(box[0] * w)), int(np.ceil(box[2] * w))
    y0, y1 = int(np.floor(box[1] * h)), int(np.ceil(box[3] * h))
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
    return slice(y0, y1), slice(x0, x1)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (..., C, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(img).movedim(-1, -3).float().div_(127.5).sub_(1.0)


def train_aug(strength: float, with_boxes: bool = False) -> A.Compose:
    """Train-time augmentation shared by both stages; applied identically to all channels.

    Geometry (flip, affine) plus acquisition (contrast, gamma, noise, blur): scanners and
    reconstruction kernels differ in noise and sharpness, and the model should not learn one
    scanner's look (the cross-style check, docs/benchmarks.md). Small data sets from scratch
    need a low ``strength`` (the demo's stage 2 uses 0.3). Noise is a share of 255.
    """
    ranges = {"rotate": 12, "translate": 0.06, "contrast": 0.15, "noise": 0.03}  # at strength 1
    return augmentation(strength, **ranges, acquisition=True, bboxes=with_boxes)


class _CacheDataset(StageDataset):
    """Common parts: the prep dir's volume cache and the train-only augmentation strength."""

    def __init__(
        self, table: pd.DataFrame, cfg: Mapping[str, Any], train: bool, aug: float, prep=None
    ):
        super().__init__(table, cfg, train)
        self.prep = Path(prep) if prep is not None else paths.prep_dir(cfg)
        self.aug = aug if train else 0.0

    def volume(self, uid: str) -> np.ndarray:
        return _volume(str(layout.volume_path(self.prep, uid)))


# ---- stage 1 ------------------------------------------------------------------------------------
@DATASETS.register("vertebra_slices")
class VertebraSlices(_CacheDataset):
    """One 2.5D slice per row: ``image`` (in_chans, H, W), ``z`` () relative position; targets of the CENTRE slice.

    Targets (train/val): ``box`` (4,) normalised x0, y0, x1, y1; ``ratios`` (7,); ``vertebrae`` ().
    Rows without targets (inference tables: StudyInstanceUID, slice) give the image only.

    ``z_jitter`` (training only): z becomes s * z + t with s ~ U(1 +- z_jitter) and
    t ~ U(+-z_jitter / 2). How much of the neck and chest a scan covers varies, so the level of
    a slice must come from the image and the anatomical order, not from where it sits in the
    stack (without it, on scans reaching further down, C7 went unfound in 15 of 24 studies).
    """

    def __init__(
        self,
        table,
        cfg,
        train,
        image_size: int = 128,
        in_chans: int = 3,
        slice_step: int = 1,
        aug: float = 1.0,
        z_jitter: float = 0.0,
        prep: Path | None = None,
    ):
        super().__init__(table, cfg, train, aug, prep)
        self.image_size, self.in_chans, self.slice_step = image_size, in_chans, slice_step
        self.z_jitter = z_jitter if self.aug else 0.0
        self.has_targets = set(VERTEBRAE + BOX_COLS) <= set(self.table.columns)
        self.transform = train_aug(self.aug, with_boxes=True) if self.aug else None

    key_columns = (UID, "slice")

    @staticmethod
    def load_table(cfg) -> pd.DataFrame:
        path = layout.stage1_labels_csv(paths.prep_dir(cfg))
        table = pd.read_csv(path, dtype={UID: str})
        if table.empty:
            raise ValueError(
                f"{path} has no rows: stage 1 needs segmented studies (segmentations/*.nii)"
            )
        return table

    @staticmethod
    def oof_table(cfg) -> pd.DataFrame:
        """Every slice of every cached train study (segmented or not): StudyInstanceUID, slice."""
        studies = pd.read_csv(layout.studies_csv(paths.prep_dir(cfg)), dtype={UID: str})
        return slice_table(studies[studies["split"] == "train"])

    @staticmethod
    def oof_inputs(cfg) -> list[Path]:
        return [layout.studies_csv(paths.prep_dir(cfg))]

    @staticmethod
    def output_columns(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            **dict(zip(BOX_COLS, out["box"].T, strict=True)),
            **dict(zip(VERTEBRAE, out["ratios"].T, strict=True)),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.table.iloc[index]
        vol = self.volume(row.StudyInstanceUID)
        img = stack_slices(vol, int(row.slice), self.in_chans, self.slice_step)
        rng = self.rng(index)
        z = int(row.slice) / max(len(vol) - 1, 1)
        if self.z_jitter:
            z = z * rng.uniform(1 - self.z_jitter, 1 + self.z_jitter)
            z += rng.uniform(-self.z_jitter / 2, self.z_jitter / 2)
        z = torch.tensor(z, dtype=torch.float32)
        if img.shape[0] != self.image_size:
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
            img = img.reshape(self.image_size, self.image_size, -1)
        sample: dict[str, torch.Tensor] = {"z": z}
        if not self.has_targets:
            return {"image": to_tensor(img), "z": z}
        box = row[BOX_COLS].to_numpy(np.float32)
        has_box = bool(row.vertebrae and box[2] > box[0] and box[3] > box[1])
        if self.transform is not None:
            self.transform.set_random_seed(int(rng.integers(2**31)))
            res = self.transform(
                image=img, bboxes=[box] if has_box else np.zeros((0, 4)), box_labels=[0] * has_box
            )
            img = res["image"]
            if has_box and len(res["bboxes"]):
                box = np.asarray(res["bboxes"][0], np.float32)
            has_box = has_box and len(res["bboxes"]) > 0
        sample["image"] = to_tensor(img)
        sample["box"] = torch.from_numpy(box if has_box else np.zeros(4, np.float32))
        sample["ratios"] = torch.from_numpy(row[VERTEBRAE].to_numpy(np.float32))
        sample["vertebrae"] = torch.tensor(float(has_box))
        return sample

    @staticmethod
    def evaluate(out: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
        ratios = table[VERTEBRAE].to_numpy(np.float32)
        has = table["vertebrae"].to_numpy() > 0
        box_mae = np.abs(out["box"][has] - table.loc[has, BOX_COLS].to_numpy(np.float32)).mean()
        return {
            "ratio_mae": float(np.abs(out["ratios"] - ratios).mean()),
            "box_mae": float(box_mae),
        }


# ---- stage 2 ------------------------------------------------------------------------------------
@DATASETS.register("vertebra_sequences")
class VertebraSequences(_CacheDataset):
    """One (study, vertebra) per row: ``image`` (seq_len, in_chans, H, W) crops of the study box.

    ``seq_len`` centre slices are spread evenly over the vertebra's slice range [start, end]
    (training jitters them by up to half a step); every crop is the same study box (normalised
    x0, y0, x1, y1, so it is right for non-square slices), and one augmentation is applied to the
    whole sequence. Target (train/val): ``target`` () = fractured.
    """

    def __init__(
        self,
        table,
        cfg,
        train,
        image_size: int = 96,
        in_chans: int = 3,
        seq_len: int = 24,
        slice_step: int = 1,
        aug: float = 1.0,
        prep: Path | None = None,
    ):
        super().__init__(table, cfg, train, aug, prep)
        self.image_size, self.in_chans, self.seq_len, self.slice_step = (
            image_size,
            in_chans,
            seq_len,
            slice_step,
        )
        self.transform = train_aug(self.aug) if self.aug else None

    key_columns = (UID, "vertebra", "start", "end", *BOX_COLS)
    ensemble_output = "logit"  # written as is: the patient head reads logits
    label_column = "fractured"

    @staticmethod
    def load_table(cfg) -> pd.DataFrame:
        """stage2_labels_oof.csv (from stage-1 OOF predictions) joined with the train.csv labels."""
        ranges = pd.read_csv(layout.stage2_labels_csv(cfg, "oof"), dtype={UID: str})
        labels = pd.read_csv(layout.labels_csv(paths.data_dir(cfg)), dtype={UID: str})
        long = labels.melt(
            "StudyInstanceUID", VERTEBRAE, var_name="vertebra", value_name="fractured"
        )
        return ranges.merge(long, on=["StudyInstanceUID", "vertebra"], how="inner", validate="1:1")

    @staticmethod
    def oof_inputs(cfg) -> list[Path]:
        return [layout.stage2_labels_csv(cfg, "oof")]

    @staticmethod
    def output_columns(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logit": out["logit"]}

    def centres(self, start: int, end: int, index: int) -> np.ndarray:
        pos = np.linspace(start, end, self.seq_len)
        if self.train and self.aug and end > start:
            half = 0.5 * (end - start) / max(self.seq_len - 1, 1)
            pos = pos + self.rng(index).uniform(-half, half, self.seq_len)
        return np.clip(np.rint(pos), start, end).astype(int)

    def resize(self, region: np.ndarray) -> np.ndarray:
        """(h, w, C) cropped region -> (image_size, image_size, C)."""
        out = cv2.resize(region, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        return out.reshape(self.image_size, self.image_size, -1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.table.iloc[index]
        vol = self.volume(row.StudyInstanceUID)
        rows, cols = box_region(row[BOX_COLS].to_numpy(np.float64), *vol.shape[1:])
        seq = [  # crop first: only the box region of each slice is read and copied
            self.resize(stack_slices(vol, c, self.in_chans, self.slice_step, rows, cols))
            for c in self.centres(int(row.start), int(row.end), index)
        ]
        img = np.concatenate(seq, axis=-1)  # (H, W, S * C): one transform for the whole sequence
        if self.transform is not None:
            self.transform.set_random_seed(int(self.rng(index).integers(2**31)))
            img = self.transform(image=img)["image"]
        img = img.reshape(self.image_size, self.image_size, self.seq_len, self.in_chans)
        sample = {"image": to_tensor(np.moveaxis(img, 2, 0))}
        if "fractured" in row:
            sample["target"] = torch.tensor(float(row.fractured))
        return sample

    @staticmethod
    def evaluate(out: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
        y = table["fractured"].to_numpy(np.float64)
        p = np.clip(1 / (1 + np.exp(-out["logit"].astype(np.float64))), 1e-7, 1 - 1e-7)
        w = np.where(y > 0, 2.0, 1.0)
        wll = float((w * -(y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())
        auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
        return {"wlogloss": wll, "auc": auc}


# ---- patient level ------------------------------------------------------------------------------
def study_logit_table(
    preds: pd.DataFrame, priors: Mapping[str, float], uids: Iterable[str] | None = None
) -> pd.DataFrame:
    """Per-vertebra stage-2 logits (long) -> one row per study: ``logit_Ci`` and ``missing_Ci``.

    ``uids`` (default: the studies in ``preds``) sets the rows, so a study without any prediction
    still gets one. A vertebra without a prediction gets the logit of its train prior and
    ``missing_Ci = 1``.
    """
    wide = preds.pivot_table(index="StudyInstanceUID", columns="vertebra", values="logit")
    wide = wide.reindex(columns=VERTEBRAE)
    if uids is not None:
        wide = wide.reindex(pd.Index(list(uids), name="StudyInstanceUID"))
    out = pd.DataFrame(index=wide.index)
    for v in VERTEBRAE:
        p = float(np.clip(priors[v], 1e-4, 1 - 1e-4))
        out[f"missing_{v}"] = wide[v].isna().astype(np.float32)
        out[f"logit_{v}"] = wide[v].fillna(np.log(p / (1 - p))).astype(np.float32)
    return out.reset_index()


def train_priors(cfg) -> dict[str, float]:
    """Add-one smoothed prevalence of each target in train.csv: (positives + 1) / (studies + 2).

    The fill for studies/vertebrae without predictions and the constant-prior baseline. Smoothing
    keeps a target that a small training set never shows positive (or always does) away from
    0 and 1, where the clipped log loss of one surprise would be ~14. A test folder without
    train.csv uses the priors the CV report saved from the training data.
    """
    labels_path = layout.labels_csv(paths.data_dir(cfg))
    if labels_path.is_file():
        labels = pd.read_csv(labels_path, dtype={UID: str})
        return {t: float((labels[t].sum() + 1) / (len(labels) + 2)) for t in TARGETS}
    saved = layout.priors_json(cfg)
    if not saved.is_file():
        raise InputError(
            f"{labels_path} not found and no saved train priors ({saved}); "
            "run the CV report (inference.py --split oof) on the training data first"
        )
    return json.loads(saved.read_text())


def slice_table(studies: pd.DataFrame) -> pd.DataFrame:
    """Every slice of each study of a studies table (StudyInstanceUID, n_slices), in UID order."""
    studies = studies.sort_values(UID)
    return pd.DataFrame(
        {
            UID: np.repeat(studies[UID].to_numpy(), studies["n_slices"].to_numpy()),
            "slice": np.concatenate(
                [np.arange(n) for n in studies["n_slices"]] or [np.zeros(0, int)]
            ),
        }
    )


@DATASETS.register("study_logits")
class StudyLogits(StageDataset):
    """One study per row: ``logits`` (7,), ``missing`` (7,); target ``targets`` (8,) in TARGETS order."""

    def __init__(self, table, cfg, train):
        super().__init__(table, cfg, train)
        self.logits = torch.tensor(
            self.table[[f"logit_{v}" for v in VERTEBRAE]].to_numpy(np.float32)
        )
        self.missing = torch.tensor(
            self.table[[f"missing_{v}" for v in VERTEBRAE]].to_numpy(np.float32)
        )
        self.targets = (
            torch.tensor(self.table[TARGETS].to_numpy(np.float32))
            if set(TARGETS) <= set(self.table)
            else None
        )

    key_columns = (UID,)

    @staticmethod
    def load_table(cfg) -> pd.DataFrame:
        """Stage-2 OOF predictions pivoted per study, joined with train.csv."""
        preds = pd.read_csv(paths.preds_csv(cfg, cfg["stages"]["fracture"]), dtype={UID: str})
        labels = pd.read_csv(layout.labels_csv(paths.data_dir(cfg)), dtype={UID: str})
        table = study_logit_table(preds, train_priors(cfg))
        return table.merge(labels, on="StudyInstanceUID", how="inner", validate="1:1")

    @staticmethod
    def oof_table(cfg) -> pd.DataFrame:
        """Every train study, also those without any stage-2 prediction (prior logits, missing=1)."""
        preds = pd.read_csv(paths.preds_csv(cfg, cfg["stages"]["fracture"]), dtype={UID: str})
        labels = pd.read_csv(layout.labels_csv(paths.data_dir(cfg)), dtype={UID: str})
        return study_logit_table(preds, train_priors(cfg), labels[UID])

    @staticmethod
    def oof_inputs(cfg) -> list[Path]:
        return [paths.preds_csv(cfg, cfg["stages"]["fracture"])]

    @staticmethod
    def output_columns(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head's eight logits as probabilities (float64), named like the targets."""
        probs = 1 / (1 + np.exp(-out["logits"].astype(np.float64)))
        return dict(zip(TARGETS, probs.T, strict=True))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {"logits": self.logits[index], "missing": self.missing[index]}
        if self.targets is not None:
            sample["targets"] = self.targets[index]
        return sample

    @staticmethod
    def evaluate(out: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
        probs = 1 / (1 + np.exp(-out["logits"].astype(np.float64)))
        pred = pd.DataFrame(probs, columns=TARGETS).assign(
            StudyInstanceUID=table["StudyInstanceUID"].values
        )
        return {"metric": score(pred, table[["StudyInstanceUID", *TARGETS]])}
