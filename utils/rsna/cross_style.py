"""Shifted-data checks: the trained chain on studies unlike those it was trained on.

Usage (``make demo`` runs it on the generator's ``unseen`` preset)::

    python -m utils.rsna.cross_style --CFG config/rsna/patient_head.yaml --data-dir D \
        [--name cross_style|phantom] [key=value ...]

``D`` is a test-only competition folder with its answers in ``test_labels.csv`` (train.csv
schema). The whole test chain predicts it (intermediates in its own test folder), the submission
is scored against the answers beside the constant train prior and 0.5 everywhere, and the result
is added to ``cv_report.{json,md}`` under ``--name`` (a later CV report drops it until this runs
again).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from utils import cli, paths
from utils.config import Config
from utils.errors import InputError
from utils.io import write_text
from utils.rsna import layout
from utils.rsna.datasets import train_priors
from utils.rsna.metric import TARGETS, UID, long_to_wide, per_target_auc, score
from utils.rsna.report import SHIFTED_CHECKS, report_markdown
from utils.rsna.submit import test_chain

ANSWERS = "test_labels.csv"


def score_folder(cfg: Config, data: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The test chain on ``data`` scored against its answers: (predictions wide, truth, result)."""
    answers = data / ANSWERS
    report_path = paths.cv_report(cfg, "json")
    if not answers.is_file():
        raise InputError(f"{answers} not found: the cross-style set needs its answers")
    if not report_path.is_file():
        raise InputError(f"{report_path} not found: run the CV report on the training data first")
    truth = pd.read_csv(answers, dtype={UID: str})
    test_cfg = cfg.replace(data_dir=str(data))
    sub = test_chain(test_cfg, layout.submission_csv(test_cfg))
    wide = long_to_wide(sub).set_index(UID).reindex(truth[UID]).reset_index()
    priors = train_priors(cfg)
    constant = truth[[UID]].assign(**{t: priors[t] for t in TARGETS})
    result = {
        "data": str(data),
        "n_studies": len(truth),
        "metric": score(wide, truth),
        "baseline_prior": score(constant, truth),
        "baseline_half": score(truth[[UID]].assign(**{t: 0.5 for t in TARGETS}), truth),
        "per_target_auc": per_target_auc(wide, truth),
    }
    return wide, truth, result


def cross_style(cfg: Config, data: Path, name: str = "cross_style") -> dict:
    """Score the chain on ``data`` and add the result to the CV report under ``name``."""
    _, _, result = score_folder(cfg, data)
    report_path = paths.cv_report(cfg, "json")
    report = json.loads(report_path.read_text())
    report[name] = result
    write_text(json.dumps(report, indent=2), report_path)
    write_text(report_markdown(report), paths.cv_report(cfg, "md"))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg="config/rsna/patient_head.yaml")
    parser.add_argument("--data-dir", required=True, type=Path, help="test-only folder + answers")
    parser.add_argument(
        "--name", default="cross_style", choices=sorted(SHIFTED_CHECKS), help="the check's key"
    )
    args = parser.parse_args(argv)
    with cli.running():
        r = cross_style(cli.load(args), args.data_dir, args.name)
    print(
        f"{args.name} ({r['n_studies']} studies): metric {r['metric']:.4f} | "
        f"constant prior {r['baseline_prior']:.4f} | 0.5 everywhere {r['baseline_half']:.4f}"
    )


if __name__ == "__main__":
    main()
