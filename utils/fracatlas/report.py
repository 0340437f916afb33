"""FracAtlas CV report: nnU-Net Dice / IoU beside the plain and the mask-guided classifier.

Written after each classifier's OOF pass (the pipeline's ``after_oof`` hook) from whatever
exists: nnU-Net's evaluations (``nnunet/evaluation_{oof,test}.json``), the classifiers' OOF
predictions (``<exp>/preds_oof.csv``, same fold file for both) and their test predictions
(``inference.py --split test``). Products in ``<output_dir>/fracatlas/``: ``cv_report.{json,md}``,
``cv_roc.png`` (ROC of both classifiers, OOF) and ``overlays/<case>.png`` (image | truth |
nnU-Net OOF prediction).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from utils import cli, ensemble, paths
from utils.config import Config
from utils.experiments import CvResult
from utils.fracatlas import layout
from utils.fracatlas.folds import read_cases
from utils.fracatlas.layout import ID
from utils.fracatlas.metric import classification_metrics, seg_cases, seg_metrics
from utils.fracatlas.preprocess import CASE
from utils.io import write_text
from utils.plots import plt, save_figure
from utils.predict import read_predictions

log = logging.getLogger(__name__)
# The classifiers the report compares (report.<kind> names each one's exp_name) and their labels.
KINDS = {"plain": "image only", "guided": "image + nnU-Net map", "ensemble": "ensemble"}


def _round(d: dict) -> dict:
    return {
        k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in d.items()
    }


def classifier_results(cfg: Config, path: Path) -> dict | None:
    """Metrics of a predictions CSV (``prob`` + ``fractured``), None when it does not exist."""
    if not path.is_file():
        return None
    preds = read_predictions(path, ID)
    return _round(
        classification_metrics(
            preds["fractured"].astype(int).to_numpy(),
            preds["prob"].to_numpy(),
            cfg.report.threshold,
        )
    )


def seg_results(cfg: Config, split: str) -> dict | None:
    path = layout.seg_summary(cfg, split)
    return _round(seg_metrics(seg_cases(path))) if path.is_file() else None


def build_report(cfg: Config) -> dict:
    """The report's content: n_images, seg_* (OOF), cls_* for both classifiers, test blocks."""
    exps = {kind: cfg.report[kind] for kind in KINDS}
    oof = {k: classifier_results(cfg, paths.preds_csv(cfg, e)) for k, e in exps.items()}
    test = {k: classifier_results(cfg, paths.test_preds_csv(cfg, e)) for k, e in exps.items()}
    seg = seg_results(cfg, "oof") or {}
    cases = read_cases(cfg)
    pool = cases[cases["split"] == "train"]

    def pick(block: dict | None, key: str):
        return None if block is None else block[key]

    return {
        "n_images": int(len(pool)),
        "n_fractured": int(pool["fractured"].sum()),
        "n_folds": int(pd.read_csv(paths.folds_csv(cfg))["fold"].nunique()),
        "seg_dice": seg.get("seg_dice"),
        "seg_iou": seg.get("seg_iou"),
        "seg_dice_all": seg.get("seg_dice_all"),
        "seg_iou_all": seg.get("seg_iou_all"),
        "cls_auc": pick(oof["plain"], "auc"),
        "cls_auc_mask_guided": pick(oof["guided"], "auc"),
        "cls_auc_ensemble": pick(oof["ensemble"], "auc"),
        "ensemble": ensemble_block(cfg, exps["ensemble"]),
        "segmentation_oof": seg or None,
        "classifier_oof": oof,
        "segmentation_test": seg_results(cfg, "test"),
        "classifier_test": test,
        "nnunet_trainer": cfg.nnunet.trainer,
        "experiments": exps,
        "conventions": "seg_dice/seg_iou: mean over fractured images; *_all: every scored image, "
        "empty truth and prediction = 1; classifier metrics at report.threshold",
    }


def ensemble_block(cfg: Config, exp: str) -> dict | None:
    """The classifier ensemble ``exp`` (if it has a record): each member, the plain mean and the
    ensemble with the weights it uses, on the members' validation metric (OOF ROC-AUC)."""
    record = ensemble.read_record(cfg, exp)
    if record is None:
        return None
    metric, lines = ensemble.predictors(cfg, exp)
    fit = record["fit"]
    rows = [p.row() for p in lines]
    return {"exp": exp, "metric": metric, "fit": fit["method"] if fit else None, "rows": rows}


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def markdown(report: dict) -> str:
    """The report as a Markdown page."""
    lines = [
        "# FracAtlas cross-validation report",
        "",
        f"{report['n_images']} training-pool images ({report['n_fractured']} fractured), "
        f"{report['n_folds']} folds shared by nnU-Net and both classifiers; nnU-Net trainer "
        f"`{report['nnunet_trainer']}`.",
        "",
        "## Segmentation (nnU-Net 2D, nnU-Net's own evaluation)",
        "",
        "| set | Dice (fractured) | IoU (fractured) | Dice (all) | IoU (all) | FP image rate | images |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, key in (("OOF", "segmentation_oof"), ("test", "segmentation_test")):
        s = report[key]
        if s:
            lines.append(
                f"| {name} | {_fmt(s['seg_dice'])} | {_fmt(s['seg_iou'])} | {_fmt(s['seg_dice_all'])} "
                f"| {_fmt(s['seg_iou_all'])} | {_fmt(s['fp_image_rate'])} | {s['n_seg_images']} "
                f"({s['n_seg_fractured']} fractured) |"
            )
    lines += [
        "",
        "## Classification (fractured vs not)",
        "",
        "| classifier | set | ROC-AUC | AP | F1 | sensitivity | specificity | images |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label in KINDS.items():
        for name, key in (("OOF", "classifier_oof"), ("test", "classifier_test")):
            c = report[key][kind]
            if c:
                lines.append(
                    f"| {label} | {name} | {_fmt(c['auc'])} | {_fmt(c['ap'])} | {_fmt(c['f1'])} "
                    f"| {_fmt(c['sensitivity'])} | {_fmt(c['specificity'])} | {c['n']} |"
                )
    if report["ensemble"]:
        lines += ensemble.report_section(report["ensemble"], "The classifier ensemble `{exp}`")
    lines += ["", f"Conventions: {report['conventions']}.", ""]
    return "\n".join(lines)


def plot_roc(cfg: Config, path: Path) -> Path | None:
    """OOF ROC curves of the classifiers on one plot (None when none has predictions)."""
    curves = {}
    for kind, label in KINDS.items():
        csv = paths.preds_csv(cfg, cfg.report[kind])
        if csv.is_file():
            curves[label] = read_predictions(csv, ID)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, preds in curves.items():
        y, p = preds["fractured"].astype(int), preds["prob"]
        fpr, tpr, _ = roc_curve(y, p)
        auc = classification_metrics(y.to_numpy(), p.to_numpy(), cfg.report.threshold)["auc"]
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity"), ax.set_ylabel("sensitivity"), ax.legend(loc="lower right")
    ax.set_title("FracAtlas OOF ROC")
    return save_figure(fig, path)


def plot_overlays(cfg: Config, n: int) -> list[Path]:
    """Up to ``n`` OOF fractured images: image | truth (green) | nnU-Net prediction (red)."""
    predictions = layout.seg_predictions(cfg, "oof")
    if not predictions.is_dir() or n <= 0:
        return []
    raw = paths.nnunet_raw_dataset(cfg)
    cases = read_cases(cfg)
    chosen = cases[
        (cases["split"] == "train") & (cases["n_instances"] > 0) & (cases["label"] != "")
    ]
    written = []
    for row in chosen.sort_values(CASE).head(n).itertuples(index=False):
        img = cv2.imread(str(raw / row.image), cv2.IMREAD_GRAYSCALE)
        truth = cv2.imread(str(raw / row.label), cv2.IMREAD_GRAYSCALE)
        pred = cv2.imread(str(predictions / f"{row.case_id}.png"), cv2.IMREAD_GRAYSCALE)
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.5))
        for ax, (title, mask, colour) in zip(
            axes,
            [("image", None, None), ("truth", truth, "Greens"), ("nnU-Net", pred, "Reds")],
            strict=True,
        ):
            ax.imshow(img, cmap="gray")
            if mask is not None:
                ax.imshow(np.ma.masked_equal(mask, 0), cmap=colour, vmin=0, vmax=1, alpha=0.7)
            ax.set_title(title), ax.axis("off")
        fig.suptitle(row.image_id, fontsize=9)
        written.append(save_figure(fig, layout.overlays_dir(cfg) / f"{row.case_id}.png"))
    return written


def write_report(cfg: Config) -> dict:
    """Write ``cv_report.{json,md}``, the ROC plot and the overlays; returns the report."""
    report = build_report(cfg)
    write_text(json.dumps(report, indent=2) + "\n", paths.cv_report(cfg, "json"))
    write_text(markdown(report), paths.cv_report(cfg, "md"))
    plot_roc(cfg, layout.roc_png(cfg))
    plot_overlays(cfg, int(cfg.report.overlays))
    return report


def summarise(cfg: Config) -> str:
    """Write the report; its one-line summary."""
    r = write_report(cfg)
    return (
        f"nnU-Net OOF Dice (fractured) {_fmt(r['seg_dice'])} | classifier OOF AUC: image only "
        f"{_fmt(r['cls_auc'])}, mask-guided {_fmt(r['cls_auc_mask_guided'])} | "
        f"report {paths.cv_report(cfg, 'md')}"
    )


def after_oof(run: Config) -> CvResult:
    """The pipeline's ``after_oof`` hook: the report, and the OOF ROC-AUC of ``run``'s classifier."""
    summary = summarise(run)
    auc = classifier_results(run, paths.preds_csv(run))["auc"]
    return CvResult(summary, "oof_auc", auc, "max")


def main(argv: list[str] | None = None) -> None:
    """``python -m utils.fracatlas.report --CFG config/fracatlas/base.yaml [key=value ...]``."""
    cli.config_command(__doc__, summarise, "config/fracatlas/base.yaml", argv)


if __name__ == "__main__":
    main()
