"""Figures every pipeline uses: training curves and reliability diagrams (matplotlib, headless).

A pipeline's own figures import ``plt`` and :func:`save_figure` from here, so the headless backend
is chosen before pyplot loads.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.io import atomic_path  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)
