"""HipMRI test report: per-class Dice of the predicted test masks and overlay PNGs.

Written by the test hook (utils/hipmri/submit.py) when the test slices have masks:
``<output_dir>/hipmri/cv_report.{md,json}`` (Dice per class pooled over the test slices, the
foreground mean, ``n_test``) and overlays of a few slices (truth vs prediction) in
``<output_dir>/hipmri/test_overlays/``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
from matplotlib.colors import ListedColormap

from utils import paths
from utils.config import Config
from utils.hipmri import layout
from utils.hipmri.datasets import MaskWriter
from utils.hipmri.metric import CLASSES, FOREGROUND, dice_from_counts, dice_summary
from utils.hipmri.slices import read_image, read_mask
from utils.io import write_text
from utils.plots import plt, save_figure

log = logging.getLogger(__name__)
# Label colours of the overlays: transparent background, then body, bone, bladder, rectum, prostate.
COLOURS = ListedColormap(
    [
        (0, 0, 0, 0),
        (0.2, 0.6, 0.2, 0.25),
        (1, 1, 0.3, 0.6),
        (0.2, 0.5, 1, 0.6),
        (0.9, 0.4, 0.1, 0.6),
        (1, 0.1, 0.6, 0.8),
    ]
)


def write_report(run: Config, writer: MaskWriter, table: pd.DataFrame, folds: list[int]) -> dict:
    """``cv_report.{json,md}`` from the writer's pooled counts; returns the JSON content."""
    summary = dice_summary(dice_from_counts(writer.counts))
    rounded = {k: None if math.isnan(v) else round(v, 4) for k, v in summary.items()}
    report = {
        "dice": {c: rounded[f"dice_{c}"] for c in CLASSES},
        "dice_mean_foreground": rounded["dice_mean_fg"],
        "n_test": int(writer.n_scored),
        "n_predicted": len(table),
        "data_dir": str(paths.data_dir(run)),
        "exp_name": run.exp_name,
        "folds": folds,
        "dice_convention": "pooled over the test slices; null = class absent in truth and prediction",
    }
    write_text(json.dumps(report, indent=2) + "\n", paths.cv_report(run, "json"))
    write_text(
        f"# HipMRI test report ({run.exp_name}, folds {folds})\n\n"
        f"{report['n_test']} test slices with ground truth from `{report['data_dir']}`; Dice pooled "
        "over the slices (a class absent from truth and prediction has none).\n\n"
        + dice_table(report)
        + "\n",
        paths.cv_report(run, "md"),
    )
    return report


def dice_table(report: dict) -> str:
    """Markdown table of the per-class Dice of a report."""
    lines = ["| class | Dice |", "|---|---:|"]
    for name, d in report["dice"].items():
        lines.append(f"| {name} | {'n/a' if d is None else f'{d:.4f}'} |")
    mean = report["dice_mean_foreground"]
    lines.append(f"| **mean foreground** | **{'n/a' if mean is None else f'{mean:.4f}'}** |")
    return "\n".join(lines)


def pick_overlays(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` scored slices, one per scan: the slice with the most prostate in the truth."""
    scored = table[table["mask"] != ""].reset_index(drop=True)
    if scored.empty or n <= 0:
        return scored.iloc[:0]
    prostate = [int((read_mask(p, len(CLASSES)) == 5).sum()) for p in scored["mask"]]
    best = scored.assign(prostate=prostate).sort_values("prostate", ascending=False)
    return best.drop_duplicates(["patient", "week"]).head(n).sort_values(layout.ID)


def plot_overlays(table: pd.DataFrame, masks: Path, folder: Path, n: int) -> list[Path]:
    """PNG per picked slice: image | truth overlay | prediction overlay."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for row in pick_overlays(table, n).itertuples(index=False):
        img = read_image(row.image)
        truth = read_mask(row.mask, len(CLASSES))
        pred = read_mask(masks / layout.mask_name_of(Path(row.image).name), len(CLASSES))
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 5))
        for ax, (title, labels) in zip(
            axes, [("image", None), ("truth", truth), ("prediction", pred)], strict=True
        ):
            ax.imshow(img, cmap="gray")
            if labels is not None:
                ax.imshow(
                    labels, cmap=COLOURS, vmin=0, vmax=len(CLASSES) - 1, interpolation="nearest"
                )
            ax.set_title(title), ax.axis("off")
        fig.suptitle(
            f"{getattr(row, layout.ID)}  ({', '.join(FOREGROUND)}: green, yellow, "
            "blue, orange, pink)",
            fontsize=8,
        )
        written.append(save_figure(fig, folder / f"{getattr(row, layout.ID)}.png"))
    return written
