"""HipMRI test-time run: fold-mean masks of the test split, per-class Dice, report and overlays.

``python inference.py --CFG config/hipmri/unet.yaml --split test [--data-dir D] [--out DIR]``
writes ``DIR/seg_<p>_week_<w>_slice_<s>.nii.gz`` for every image of ``D/keras_slices_test/``
(input shape and affine, labels 0..5) and ``DIR/slices.csv`` (per-slice Dice). When masks are
present in ``keras_slices_seg_test/``: ``<output_dir>/hipmri/cv_report.{md,json}`` (Dice per
class pooled over the test slices, the foreground mean, ``n_test``) and overlay PNGs of a few
slices (truth vs prediction) in ``<output_dir>/hipmri/test_overlays/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from utils import paths  # noqa: E402
from utils.config import Config  # noqa: E402
from utils.hipmri import layout  # noqa: E402
from utils.hipmri.datasets import HipSlices, MaskWriter  # noqa: E402
from utils.hipmri.metric import CLASSES, FOREGROUND, dice_from_counts  # noqa: E402
from utils.hipmri.slices import read_image, read_mask  # noqa: E402
from utils.io import atomic_path, write_text  # noqa: E402
from utils.predict import load_models, predict_to, run_config  # noqa: E402

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


def test_chain(cfg: Config, out: Path | None) -> Path:
    """The pipeline's ``test`` hook: masks of ``cfg.data_dir``'s test split into ``out``.

    ``out`` None: ``masks/`` in the data folder's test folder (utils/paths.test_dir).
    """
    run = run_config(cfg)
    out = Path(out) if out is not None else paths.test_dir(cfg) / "masks"
    table = HipSlices.test_table(run)
    if table.empty:
        raise SystemExit(
            f"error: no test images in {layout.image_dir(paths.data_dir(run), 'test')}"
        )
    models = load_models(run)
    log.info("predicting %d test slices with folds %s", len(table), sorted(models))
    with HipSlices.make_writer(run, out, table) as writer:
        predict_to(writer, run, models.values(), table)
    if writer.n_scored:
        report = write_report(run, writer, table, sorted(models))
        print(dice_table(report))
        plot_overlays(
            table, Path(out), paths.pipeline_dir(run) / "test_overlays", int(run.report.overlays)
        )
    print(f"test masks: {out} ({len(table)} slices)")
    return Path(out)


def write_report(run: Config, writer: MaskWriter, table: pd.DataFrame, folds: list[int]) -> dict:
    """``cv_report.{json,md}`` from the writer's pooled counts; returns the JSON content."""
    dice = dice_from_counts(writer.counts)
    fg = dice[1:]
    report = {
        "dice": {
            c: (None if np.isnan(d) else round(float(d), 4))
            for c, d in zip(CLASSES, dice, strict=True)
        },
        "dice_mean_foreground": round(float(np.nanmean(fg)), 4) if np.isfinite(fg).any() else None,
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
        path = folder / f"{getattr(row, layout.ID)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
