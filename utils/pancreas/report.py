"""Validation report of the compared trainers: ``python -m utils.pancreas.report --CFG config/pancreas/base.yaml``.

For each trainer of ``report.trainers`` the fold ensemble predicts the validation cases of fold 0
of ``splits_final.json`` (the data set's validation/ folder) with the one-pass predictor
(utils/pancreas/submit.py) into ``<output_dir>/pancreas/predictions/validation_<trainer>/``; the
written masks are scored against the converted labels (whole-pancreas Dice on label > 0, lesion
Dice on the lesion label, means over cases) and the subtypes against the case-label CSV (macro-F1,
per-class recall). Writes ``cv_report.md`` / ``cv_report.json`` and prints the table, with the
macro-F1 of always predicting the majority training class as the baseline to beat.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from utils import cli, paths
from utils.errors import InputError
from utils.io import read_csv, write_text
from utils.pancreas import layout, metric
from utils.pancreas.submit import predict_images

log = logging.getLogger(__name__)


def split_cases(cfg, fold: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation) case ids of ``fold`` in ``splits_final.json``."""
    path = paths.nnunet_splits(cfg)
    if not path.is_file():
        raise InputError(
            f"{path} not found: write the folds first (utils.fold_split --nnunet-splits)"
        )
    split = json.loads(path.read_text())[fold]
    return list(split["train"]), list(split["val"])


def score_cases(
    pred_dir: Path,
    labels_dir: Path,
    predicted: pd.DataFrame,
    classes: dict[str, int],
    lesion_label: int,
) -> pd.DataFrame:
    """Per case: Dice of the written mask vs the converted label, true and predicted subtype."""
    rows = []
    for row in predicted.itertuples(index=False):
        pred = np.asanyarray(nib.load(pred_dir / row.Names).dataobj)
        truth = np.asanyarray(nib.load(labels_dir / row.Names).dataobj)
        d_pancreas, d_lesion = metric.case_dice(pred, truth, lesion_label)
        case = row.Names[: -len(layout.MASK_SUFFIX)]
        rows.append(
            {
                "case_id": case,
                "dsc_pancreas": d_pancreas,
                "dsc_lesion": d_lesion,
                "subtype": classes[case],
                "predicted": row.Subtype,
                "seconds": row.seconds,
            }
        )
    return pd.DataFrame(rows)


def evaluate_trainer(cfg, trainer: str, val_cases: list[str], classes: dict[str, int]) -> dict:
    """Predict and score the validation cases with ``trainer``: the report's row (and per-class recall)."""
    opts = cfg["nnunet"]["trainer_options"]
    raw = paths.nnunet_raw_dataset(cfg)
    out = layout.predictions_dir(cfg, f"validation_{trainer}")
    images = [raw / "imagesTr" / layout.image_name(c) for c in val_cases]
    predicted = predict_images(cfg, trainer, images, out)
    scored = score_cases(out, raw / "labelsTr", predicted, classes, int(opts["lesion_label"]))
    macro_f1, recall = metric.classification(
        scored["subtype"], scored["predicted"], int(opts["num_classes"])
    )
    return {
        "dsc_pancreas": round(float(scored["dsc_pancreas"].mean()), 4),
        "dsc_lesion": round(float(scored["dsc_lesion"].mean()), 4),
        "macro_f1": round(macro_f1, 4),
        "s_per_case": round(float(scored["seconds"].mean()), 3),
        "recall_per_class": [round(r, 3) for r in recall],
        "n_cases": len(scored),
    }


def markdown(results: dict[str, dict], baseline: float, tta: bool) -> str:
    lines = [
        "# Pancreas multi-task: validation report",
        "",
        f"Validation cases: {next(iter(results.values()))['n_cases']}; TTA {'on' if tta else 'off'}; "
        f"majority-class baseline macro-F1 {baseline:.4f}.",
        "",
        "| trainer | pancreas DSC | lesion DSC | macro-F1 | recall per class | s/case |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        recall = " / ".join(f"{x:.2f}" for x in r["recall_per_class"])
        lines.append(
            f"| {name} | {r['dsc_pancreas']:.4f} | {r['dsc_lesion']:.4f} | {r['macro_f1']:.4f} | {recall} | {r['s_per_case']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(cfg) -> str:
    """Evaluate every trainer of ``report.trainers`` on the validation cases; write the report."""
    table = read_csv(layout.nnunet_case_labels(cfg), dtype={"case_id": str})
    classes = dict(zip(table["case_id"], table["subtype"].astype(int), strict=True))
    train_cases, val_cases = split_cases(cfg)
    unlabelled = sorted(set(train_cases + val_cases) - set(classes))
    if unlabelled:
        raise InputError(
            f"{layout.nnunet_case_labels(cfg)} has no subtype for {len(unlabelled)} cases "
            f"(e.g. {unlabelled[:3]}): convert the data set again"
        )
    k = int(cfg["nnunet"]["trainer_options"]["num_classes"])
    baseline = metric.majority_baseline(
        [classes[c] for c in train_cases], [classes[c] for c in val_cases], k
    )
    results = {t: evaluate_trainer(cfg, t, val_cases, classes) for t in cfg["report"]["trainers"]}
    report = {
        "trainers": results,
        "majority_baseline_macro_f1": round(baseline, 4),
        "tta": not cfg["nnunet"]["disable_tta"],
    }
    write_text(json.dumps(report, indent=2) + "\n", paths.cv_report(cfg, "json"))
    text = markdown(results, baseline, report["tta"])
    write_text(text, paths.cv_report(cfg, "md"))
    return f"\n{text}\nreport: {paths.cv_report(cfg, 'md')}  {paths.cv_report(cfg, 'json')}"


def main(argv: Sequence[str] | None = None) -> None:
    cli.config_command(__doc__, write_report, "config/pancreas/base.yaml", argv)


if __name__ == "__main__":
    main()
