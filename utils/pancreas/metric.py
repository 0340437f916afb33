"""Pancreas evaluation: whole-pancreas and lesion Dice per case, macro-F1 and per-class recall (scikit-learn)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score, recall_score


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty (nothing to find, nothing found)."""
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / denom


def case_dice(pred: np.ndarray, truth: np.ndarray, lesion_label: int) -> tuple[float, float]:
    """(whole-pancreas Dice on label > 0, lesion Dice on label == ``lesion_label``) of label maps."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth {truth.shape}")
    return dice(pred > 0, truth > 0), dice(pred == lesion_label, truth == lesion_label)


def classification(
    truth: Sequence[int], pred: Sequence[int], num_classes: int
) -> tuple[float, list[float]]:
    """(macro-F1 over classes 0..K-1, recall of each class); a class never predicted scores 0."""
    labels = list(range(num_classes))
    macro = f1_score(truth, pred, labels=labels, average="macro", zero_division=0)
    recall = recall_score(truth, pred, labels=labels, average=None, zero_division=0)
    return float(macro), [float(r) for r in recall]


def majority_baseline(train: Sequence[int], truth: Sequence[int], num_classes: int) -> float:
    """Macro-F1 of always predicting the most frequent training class (the collapsed classifier)."""
    majority = int(np.bincount(np.asarray(train), minlength=num_classes).argmax())
    return classification(truth, [majority] * len(truth), num_classes)[0]
