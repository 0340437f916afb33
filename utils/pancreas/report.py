"""Validation report of the compared trainers: ``python -m utils.pancreas.report --CFG config/pancreas/base.yaml``.

For each trainer of ``report.trainers`` the fold ensemble predicts the validation cases of fold 0
of ``splits_final.json`` (the data set's validation/ folder) with the one-pass predictor
(utils/pancreas/predict.py) into ``<output_dir>/pancreas/predictions/validation_<trainer>/``; the
written masks are scored against the converted labels (whole-pancreas Dice on label > 0, lesion
Dice on the lesion label, means over cases) and the subtypes against the case-label CSV (macro-F1,
per-class recall). Writes ``cv_report.md`` / ``cv_report.json`` and prints the table, with the
macro-F1 of always predicting the majority training class as the baseline to beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from utils import paths
from utils.config import ConfigError, load_config
from utils.io import write_text
from utils.pancreas import layout, metrics
from utils.pancreas.predict import MULTITASK_ERRORS, predict_images

log = logging.getLogger(__name__)


def split_cases(cfg, fold: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation) case ids of ``fold`` in ``splits_final.json``."""
    path = paths.nnunet_splits(cfg)
    if not path.is_file():
        raise FileNotFoundError(
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
        d_pancreas, d_lesion = metrics.case_dice(pred, truth, lesion_label)
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
    out = paths.predictions_dir(cfg, f"validation_{trainer}")
    images = [raw / "imagesTr" / layout.image_name(c) for c in val_cases]
    predicted = predict_images(cfg, trainer, images, out)
    scored = score_cases(out, raw / "labelsTr", predicted, classes, int(opts["lesion_label"]))
    macro_f1, recall = metrics.classification(
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--CFG", required=True, help="config/pancreas/base.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.CFG, args.overrides)
        table = pd.read_csv(paths.nnunet_case_labels(cfg), dtype={"case_id": str})
        classes = dict(zip(table["case_id"], table["subtype"].astype(int), strict=True))
        train_cases, val_cases = split_cases(cfg)
        k = int(cfg["nnunet"]["trainer_options"]["num_classes"])
        baseline = metrics.majority_baseline(
            [classes[c] for c in train_cases], [classes[c] for c in val_cases], k
        )
        results = {
            t: evaluate_trainer(cfg, t, val_cases, classes) for t in cfg["report"]["trainers"]
        }
    except (ConfigError, *MULTITASK_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {
        "trainers": results,
        "majority_baseline_macro_f1": round(baseline, 4),
        "tta": not cfg["nnunet"]["disable_tta"],
    }
    write_text(json.dumps(report, indent=2) + "\n", paths.cv_report(cfg, "json"))
    text = markdown(results, baseline, report["tta"])
    write_text(text, paths.cv_report(cfg, "md"))
    print("\n" + text)
    print(f"report: {paths.cv_report(cfg, 'md')}  {paths.cv_report(cfg, 'json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
