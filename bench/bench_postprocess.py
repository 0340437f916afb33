"""Benchmark: every RSNA post-processing choice judged in-domain (cross-fitted OOF) and on shifted data.

Usage (from the repository root, after ``make demo`` or a full run)::

    python -m bench.bench_postprocess --CFG config/rsna/patient_head.yaml \\
        --shifted data/rsna_unseen --shifted data/rsna_phantom [key=value ...]

The trained chain predicts each shifted folder once with post-processing off (raw patient-head
output, stage-2 logits, localisation); then every combination of

- patient level: the learned head or the noisy-OR of the stage-2 probabilities,
- calibration: ``post.calibration`` methods (utils/rsna/postprocess.py CALIBRATIONS),
- prior matching: ``post.match_prior`` off or on,
- plausibility shrink: ``post.shrink`` in {0, 0.5, 0.75, 1},

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
from utils.config import Config, parse_overrides
from utils.io import write_text
from utils.predict import read_predictions, run_config
from utils.rsna import layout, postprocess
from utils.rsna.cross_style import score_folder
from utils.rsna.datasets import train_priors
from utils.rsna.metric import TARGETS, UID, score
from utils.rsna.report import post_process_oof, read_folds, stage2_wide

SHRINKS = (0.0, 0.5, 0.75, 1.0)
RAW = [
    "post.calibration=none",
    "post.match_prior=false",
    "post.shrink=0",
    "post.patient=head",
]  # the chain before post-processing


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
    raw_cfg = cfg.replace(**dict(parse_overrides(RAW)))  # typed: "false" is not truthy
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


def study(cfg: Config, shifted: list[Path]) -> list[dict]:
    """Every (patient level, calibration, shrink): OOF and shifted metrics, through the report's
    and the chain's own post-processing functions."""
    oof = oof_inputs(cfg)
    priors, ref = oof["priors"], postprocess.reference(oof["loc"])
    post = cfg.post
    flags = postprocess.implausible(
        oof["loc"], oof["uids"], float(post.min_peak), tuple(post.length_range), ref
    )
    sets = {data.name: shifted_inputs(cfg, data, priors) for data in shifted}
    rows = []
    grid = itertools.product(oof["raw"], postprocess.CALIBRATIONS, (False, True), SHRINKS)
    for level, method, match, factor in grid:
        variant = cfg.replace(
            **{"post.calibration": method, "post.match_prior": match, "post.shrink": factor}
        )
        raw = oof["raw"][level]
        _, _, final = post_process_oof(
            variant, raw, oof["uids"], oof["truth"], oof["fold"], flags, priors
        )
        row = {"aggregator": level, "calibration": method, "match_prior": match, "shrink": factor}
        row["oof"] = score(final, oof["truth"])
        fit = None if method == "none" else postprocess.fit_platt(raw, oof["truth"], method)
        for name, s in sets.items():
            final, _ = postprocess.finalise(
                s["raw"][level], s["loc"], priors, variant.post, fit, ref
            )
            row[name] = score(final, s["truth"])
        rows.append(row)
    baselines = {"aggregator": "constant prior", "calibration": "-", "match_prior": None}
    baselines["shrink"] = None
    for name, s in [("oof", oof), *sets.items()]:
        constant = s["truth"][[UID]].assign(**{t: priors[t] for t in TARGETS})
        baselines[name] = score(constant, s["truth"])
    return [*rows, baselines]


def markdown(rows: list[dict], sets: list[str], note: str) -> str:
    lines = [
        "| patient level | calibration | prior matching | shrink | OOF (cross-fitted) | "
        + " | ".join(sets)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(sets),
    ]
    for r in rows:
        match = "-" if r["match_prior"] is None else ("on" if r["match_prior"] else "off")
        shrink_text = "-" if r["shrink"] is None else f"{r['shrink']:g}"
        cells = " | ".join(f"{r[name]:.4f}" for name in ("oof", *sets))
        lines.append(
            f"| {r['aggregator']} | {r['calibration']} | {match} | {shrink_text} | {cells} |"
        )
    return "\n".join([*lines, "", note]) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = cli.parser(__doc__, cfg="config/rsna/patient_head.yaml")
    parser.add_argument(
        "--shifted", type=Path, action="append", required=True, help="a folder + answers (repeat)"
    )
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
