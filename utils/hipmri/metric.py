"""Per-class Dice for the 6 HipMRI classes.

Convention: Dice is pooled over the slices it is computed on (2 * sum TP / (sum pred + sum truth)
per class). A class absent from both the truth and the prediction has no Dice (NaN) and is left
out of means; present in one but not the other, its Dice is 0.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("background", "body", "bone", "bladder", "rectum", "prostate")
FOREGROUND = CLASSES[1:]


def dice_counts(pred: np.ndarray, truth: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """(n_classes, 3) int64: [intersection, predicted pixels, true pixels] per class.

    ``pred`` and ``truth`` are integer label arrays of one shape (any number of slices).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    pred, truth = pred.reshape(-1).astype(np.int64), truth.reshape(-1).astype(np.int64)
    both = np.bincount(pred[pred == truth], minlength=n_classes)[:n_classes]
    return np.stack(
        [
            both,
            np.bincount(pred, minlength=n_classes)[:n_classes],
            np.bincount(truth, minlength=n_classes)[:n_classes],
        ],
        axis=1,
    )


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """(n_classes,) float64 Dice from :func:`dice_counts` (summed over slices); NaN if absent in both."""
    total = counts[:, 1] + counts[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * counts[:, 0] / total, np.nan)


def dice_per_class(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(6,) Dice of each class of ``pred`` vs ``truth`` (label arrays of one shape)."""
    return dice_from_counts(dice_counts(pred, truth))


def dice_summary(dice: np.ndarray) -> dict[str, float]:
    """``{"dice_<class>": ..., "dice_mean_fg": ...}`` for the foreground classes (NaN-free mean)."""
    out = {f"dice_{name}": float(d) for name, d in zip(CLASSES, dice, strict=True)}
    fg = dice[1:]
    out["dice_mean_fg"] = float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan")
    return out
