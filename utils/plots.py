"""Figures: training curves, calibration, stage-1 localisation views (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_curves(history: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Loss curves (left) and every other ``val_*`` metric (right) per epoch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for col in ("train_loss", "val_loss"):
        ax1.plot(history["epoch"], history[col], marker="o", label=col)
    ax1.set_xlabel("epoch"), ax1.set_title("loss"), ax1.legend()
    for col in [c for c in history.columns if c.startswith("val_") and c != "val_loss"]:
        ax2.plot(history["epoch"], history[col], marker="o", label=col)
    ax2.set_xlabel("epoch"), ax2.set_title("validation metrics"), ax2.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_calibration(
    y: np.ndarray, p: np.ndarray, path: Path, bins: int = 10, title: str = ""
) -> Path:
    """Reliability diagram: mean predicted probability vs observed frequency per probability bin."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    mean_p = np.array([p[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    freq = np.array([y[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    count = np.bincount(idx, minlength=bins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.plot(mean_p, freq, marker="o", label="OOF")
    for mp_, fr, c in zip(mean_p, freq, count, strict=True):
        if c:
            ax.annotate(str(c), (mp_, fr), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel("predicted probability"), ax.set_ylabel("observed frequency"), ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def plot_localisation(vol: np.ndarray, preds: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Stage-1 view of one study: sagittal mid-plane, ratio curves along z, and an axial slice with boxes.

    ``vol``: (Z, S, S) uint8; ``preds``: per slice ``slice, x0, y0, x1, y1, C1..C7`` (predicted),
    with optional ``true_C1..true_C7`` columns drawn dashed.
    """
    z, s, _ = vol.shape
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.3, 1]})
    axes[0].imshow(vol[:, :, s // 2], cmap="gray", aspect="auto")
    axes[0].set_title("sagittal (mid column)"), axes[0].set_ylabel("slice (head -> feet)")
    colors = plt.cm.tab10(np.arange(7))
    for i in range(7):
        axes[1].plot(preds["slice"], preds[f"C{i + 1}"], color=colors[i], label=f"C{i + 1}")
        if f"true_C{i + 1}" in preds:
            axes[1].plot(preds["slice"], preds[f"true_C{i + 1}"], color=colors[i], ls="--", lw=1)
    (
        axes[1].set_xlabel("slice"),
        axes[1].set_title("predicted ratios (dashed: truth)"),
        axes[1].legend(fontsize=7, ncol=2),
    )
    k = int(preds.loc[preds[[f"C{i}" for i in range(1, 8)]].sum(axis=1).idxmax(), "slice"])
    axes[2].imshow(vol[k], cmap="gray")
    x0, y0, x1, y1 = preds.loc[preds["slice"] == k, ["x0", "y0", "x1", "y1"]].to_numpy()[0] * s
    axes[2].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
    axes[2].set_title(f"axial slice {k} with predicted box")
    fig.suptitle(title)
    return _save(fig, path)
