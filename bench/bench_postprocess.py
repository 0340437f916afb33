"""Benchmark: every RSNA post-processing choice judged in-domain (cross-fitted OOF) and on shifted data.

Usage (from the repository root, after ``make demo`` or a full run)::

    python -m bench.bench_postprocess --CFG config/rsna/patient_head.yaml \\
        --shifted data/rsna_unseen data/rsna_phantom [key=value ...]

The trained chain predicts each shifted folder once with post-processing off (raw patient-head
output, stage-2 logits, localisation); then every combination of

- patient level: the learned head or the noisy-OR of the stage-2 probabilities,
- calibration: ``post.calibration`` methods (utils/rsna/postprocess.py CALIBRATIONS),
- plausibility shrink: ``post.shrink`` in {0, 0.5, 1},

is scored on the cross-fitted OOF predictions (the calibration of fold k fitted on the other
folds, as the CV report does) and on each shifted folder (the calibration fitted on every OOF
study, as the test chain applies it), each beside its constant-prior baseline. Writes
``<output_dir>/rsna/postprocess_study.{json,md}``.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pandas as pd

from bench import common
from utils import cli, paths
from utils.config import Config
from utils.io import write_text
from utils.predict import read_predictions, run_config
from utils.rsna import layout, postprocess
from utils.rsna.cross_style import score_folder
from utils.rsna.datasets import train_priors
from utils.rsna.metric import TARGETS, UID, score
from utils.rsna.report import read_folds, stage2_wide

SHRINKS = (0.0, 0.5, 1.0)
RAW = ["post.calibration=none", "post.shrink=0"]  # the chain's output before post-processing


def aligned(wide: pd.DataFrame, uids: list[str]) -> pd.DataFrame:
    return wide.set_index(UID).loc[uids, TARGETS].reset_index()


def oof_inputs(cfg: Config) -> dict:
    """The OOF side: truth, folds, localisation and the raw predictions of both aggregators."""
    labels = pd.read_csv(layout.labels_csv(paths.data_dir(cfg)), dtype={UID: str})
    folds = read_folds(cfg)
    truth = labels[labels[UID].isin(folds[UID])].reset_index(drop=True)
    uids = truth[UID].tolist()
    priors = train_priors(cfg)
    stage2 = read_predictions(paths.preds_csv(cfg, cfg.stages.fracture), UID)
    head = read_predictions(paths.preds_csv(cfg, cfg.stages.head), UID)
    return {
        "truth": truth,
        "uids": uids,
        "fold": folds.set_index(UID).loc[uids, "fold"].to_numpy(),
        "loc": pd.read_csv(layout.stage2_labels_csv(cfg, "oof"), dtype={UID: str}),
        "raw": {
            "head": aligned(head, uids),
            "noisy_or": aligned(stage2_wide(stage2, uids, priors, "noisy_or"), uids),
        },
        "priors": priors,
    }


def shifted_inputs(cfg: Config, data: Path, priors: dict[str, float]) -> dict:
    """One shifted folder: the chain's raw head output and stage-2 noisy-OR, its localisation."""
    raw_cfg = cfg.replace(**dict(o.split("=", 1) for o in RAW))
    head, truth, _ = score_folder(raw_cfg, data)
    uids = truth[UID].tolist()
    test_cfg = raw_cfg.replace(data_dir=str(data))
    stage2 = read_predictions(
        paths.test_preds_csv(test_cfg, run_config(cfg, cfg.stages.fracture).exp_name), UID
    )
    return {
        "truth": truth,
        "uids": uids,
        "loc": pd.read_csv(layout.stage2_labels_csv(test_cfg, "test"), dtype={UID: str}),
        "raw": {
            "head": aligned(head, uids),
            "noisy_or": aligned(stage2_wide(stage2, uids, priors, "noisy_or"), uids),
        },
    }


def post_processed(
    cfg: Config, loc: pd.DataFrame, uids: list[str], calibrated: pd.DataFrame,
    ref: dict, priors: dict[str, float], factor: float,
) -> pd.DataFrame:  # fmt: skip
    """``calibrated`` after the plausibility shrink of ``factor`` (the chain's last step)."""
    post = cfg.post
    flags = postprocess.implausible(loc, uids, float(post.min_peak), tuple(post.length_range), ref)
    return postprocess.shrink(calibrated, flags, priors, factor)


def study(cfg: Config, shifted: list[Path]) -> list[dict]:
    """Every (aggregator, calibration, shrink): OOF and shifted metrics."""
    oof = oof_inputs(cfg)
    priors, ref = oof["priors"], postprocess.reference(oof["loc"])
    sets = {data.name: shifted_inputs(cfg, data, priors) for data in shifted}
    rows = []
    for aggregator, method, factor in itertools.product(
        oof["raw"], postprocess.CALIBRATIONS, SHRINKS
    ):
        raw = oof["raw"][aggregator]
        calibrated = postprocess.crossfit_platt(raw, oof["truth"], oof["fold"], method)
        final = post_processed(cfg, oof["loc"], oof["uids"], calibrated, ref, priors, factor)
        row = {"aggregator": aggregator, "calibration": method, "shrink": factor}
        row["oof"] = score(final, oof["truth"])
        params = postprocess.fit_platt(raw, oof["truth"], method)
        for name, s in sets.items():
            calibrated = postprocess.apply_platt(s["raw"][aggregator], params)
            final = post_processed(cfg, s["loc"], s["uids"], calibrated, ref, priors, factor)
            row[name] = score(final, s["truth"])
        rows.append(row)
    baselines = {"aggregator": "constant prior", "calibration": "-", "shrink": None}
    for name, s in [("oof", oof), *sets.items()]:
        constant = s["truth"][[UID]].assign(**{t: priors[t] for t in TARGETS})
        baselines[name] = score(constant, s["truth"])
    return [*rows, baselines]


def markdown(rows: list[dict], sets: list[str], note: str) -> str:
    lines = [
        "| patient level | calibration | shrink | OOF (cross-fitted) | " + " | ".join(sets) + " |",
        "|---|---|---|---|" + "---|" * len(sets),
    ]
    for r in rows:
        shrink_text = "-" if r["shrink"] is None else f"{r['shrink']:g}"
        cells = " | ".join(f"{r[name]:.4f}" for name in ("oof", *sets))
        lines.append(f"| {r['aggregator']} | {r['calibration']} | {shrink_text} | {cells} |")
    return "\n".join([*lines, "", note]) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = cli.parser(__doc__, cfg="config/rsna/patient_head.yaml")
    parser.add_argument("--shifted", type=Path, nargs="+", required=True, help="folders + answers")
    args, load_start = common.start(parser, argv)
    with cli.running():
        cfg = cli.load(args)
        rows = study(cfg, args.shifted)
    sets = [p.name for p in args.shifted]
    note = f"{time.strftime('%Y-%m-%d')}; {common.load_note(load_start)}"
    text = markdown(rows, sets, note)
    out = paths.pipeline_dir(cfg) / "postprocess_study"
    write_text(json.dumps(rows, indent=2) + "\n", out.with_suffix(".json"))
    write_text(text, out.with_suffix(".md"))
    print(text)
    return rows


if __name__ == "__main__":
    main()
