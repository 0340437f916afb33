"""FracAtlas metrics: the classifiers' (scikit-learn) and the segmentation summary of nnU-Net's evaluation.

Segmentation convention: nnU-Net gives a case whose truth and prediction are both empty no Dice
(NaN). ``seg_dice`` / ``seg_iou`` are means over the fractured images (truth not empty), the
figure the literature reports; ``*_all`` count an empty-empty image as 1 (a correct "no
fracture") and average over every scored image; ``fp_image_rate`` is the share of images
without a fracture on which anything is predicted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score


def ranking_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC-AUC and average precision of probabilities ``p`` (N,) for labels ``y`` (N,) 0/1.

    NaN when ``y`` holds a single class (a tiny validation fold).
    """
    if len(np.unique(y)) < 2:
        return {"auc": float("nan"), "ap": float("nan")}
    return {"auc": float(roc_auc_score(y, p)), "ap": float(average_precision_score(y, p))}


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC-AUC, AP, and F1 / sensitivity / specificity / accuracy at ``p >= threshold``."""
    y = np.asarray(y).astype(int)
    pred = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        **ranking_metrics(y, p),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "accuracy": float((tp + tn) / len(y)) if len(y) else float("nan"),
        "threshold": float(threshold),
        "n": int(len(y)),
        "n_fractured": int(y.sum()),
    }


def seg_cases(summary: Path) -> pd.DataFrame:
    """Per case of an nnU-Net ``summary.json``: ``case_id, dice, iou, n_ref, n_pred`` (label 1)."""
    data = json.loads(Path(summary).read_text())
    rows = []
    for entry in data["metric_per_case"]:
        m = entry["metrics"]["1"]
        rows.append(
            {
                "case_id": Path(entry["reference_file"]).name.removesuffix(".png"),
                "dice": m["Dice"],
                "iou": m["IoU"],
                "n_ref": int(m["n_ref"]),
                "n_pred": int(m["n_pred"]),
            }
        )
    return pd.DataFrame(rows, columns=["case_id", "dice", "iou", "n_ref", "n_pred"])


def seg_metrics(cases: pd.DataFrame) -> dict[str, float]:
    """Summary of :func:`seg_cases` (see the module docstring for the convention)."""
    fractured = cases[cases["n_ref"] > 0]
    empty = cases[cases["n_ref"] == 0]

    def mean(values: pd.Series) -> float | None:
        return float(values.mean()) if len(values) else None

    return {
        "seg_dice": mean(fractured["dice"]),
        "seg_iou": mean(fractured["iou"]),
        "seg_dice_all": mean(cases["dice"].fillna(1.0)),
        "seg_iou_all": mean(cases["iou"].fillna(1.0)),
        "fp_image_rate": mean((empty["n_pred"] > 0).astype(float)),
        "n_seg_fractured": int(len(fractured)),
        "n_seg_images": int(len(cases)),
    }
