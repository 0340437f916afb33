"""Benchmark: the test-time stage-1 slice stride k, OOF metric and seconds per study side by side.

Usage (after ``make demo``; the same arguments select another trained set)::

    python -m bench.bench_stride [--strides 1 2 3] [--repeat 2] [key=value ...]

Defaults: ``profile=demo data_dir=data/rsna_demo output_dir=output``.

For each stride k (``submit.stage1_stride``):

- **OOF metric**: every training study predicted by the fold models that did not train on it,
  with the functions the test chain calls: ``submit.predict_stage1`` (stage 1 on every k-th slice
  and the last, ratios interpolated along z, boxes from the predicted slices), ``localize``,
  stage 2 and the patient head (``predict_frame``), scored with ``utils.rsna.metric.score``
  against train.csv. The models are the trained ones (stage 2 and the head were trained on
  stride-1 localisation); only test-time stage 1 changes. k = 1 reproduces the CV report.
- **seconds per study**: ``submit.test_chain`` on the data set's test studies (cache deleted
  before every run so each reads its DICOM files again; no time budget), total and stage 1
  alone; median of ``--repeat`` runs after one warm-up run.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path

import pandas as pd

from bench import common
from bench.bench_inference import STEPS, timed_calls
from utils import cli, paths
from utils.config import Config, load_config
from utils.folds import load_folds
from utils.predict import load_models, predict_frame, run_config
from utils.rsna import layout, submit
from utils.rsna.datasets import study_logit_table, train_priors
from utils.rsna.localize import localize
from utils.rsna.metric import TARGETS, UID, score

log = logging.getLogger(__name__)
CONFIG = Path(__file__).resolve().parents[1] / "config" / "rsna" / "patient_head.yaml"
DEFAULTS = ["profile=demo", "data_dir=data/rsna_demo", "output_dir=output", "progress=false"]


def oof_metric(cfg: Config, stride: int) -> float:
    """The pipeline's OOF competition metric with test-time stage 1 at ``stride``."""
    stages = cfg.stages
    s1 = run_config(cfg, stages.vertebra).replace(num_workers=0)
    s2 = run_config(cfg, stages.fracture).replace(num_workers=0)
    head = run_config(cfg, stages.head)
    folds = load_folds(paths.folds_csv(cfg), UID)
    prep = paths.prep_dir(cfg)
    priors = train_priors(cfg)
    m1, m2, mh = load_models(s1), load_models(s2), load_models(head)
    wide = []
    for fold in sorted(m1):
        uids = sorted(folds.loc[folds.fold == fold, UID])
        loc = pd.concat(
            [
                localize(submit.predict_stage1(s1, u, prep, [m1[fold]], stride), **s2.localize)
                for u in uids
            ],
            ignore_index=True,
        )
        p2 = predict_frame(s2, [m2[fold]], loc, prep=prep)
        wide.append(predict_frame(head, [mh[fold]], study_logit_table(p2, priors, uids)))
    pred = pd.concat(wide, ignore_index=True)
    truth = pd.read_csv(layout.labels_csv(paths.data_dir(cfg)), dtype={UID: str})
    truth = truth[truth[UID].isin(pred[UID])]
    return score(pred[[UID, *TARGETS]], truth)


def seconds_per_study(cfg: Config, repeat: int) -> tuple[float, float, int]:
    """Median (total, stage-1) seconds per test study of ``submit.test_chain`` and the study count."""
    out = paths.test_dir(cfg) / "bench_stride_submission.csv"
    data = paths.data_dir(cfg)
    n = len(submit.studies_to_predict(submit.read_test_rows(data), data))
    runs = []
    for _ in range(repeat + 1):
        shutil.rmtree(layout.test_prep_dir(cfg), ignore_errors=True)
        with timed_calls(submit, STEPS) as seconds:
            start = time.perf_counter()
            submit.test_chain(cfg, out)
            total = time.perf_counter() - start
        runs.append((total / n, seconds["stage 1"] / n))
    runs = runs[1:]  # the first run warms up
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), n


def main() -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeat", type=int, default=2, help="timed test-chain runs per stride")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys)")
    args, load_start = common.start(parser)
    rows = []
    for k in args.strides:
        cfg = load_config(
            CONFIG,
            [*DEFAULTS, *args.overrides, f"submit.stage1_stride={k}", "submit.budget_s=null"],
        )
        metric = oof_metric(cfg, k)
        total, stage1, n = seconds_per_study(cfg, args.repeat)
        rows.append((k, metric, total, stage1, n))
        print(f"k={k}: OOF {metric:.4f}, {total:.2f} s/study ({stage1:.2f} s stage 1), {n} studies")
    print(f"{common.load_note(load_start)}; torch {args.threads} threads")
    print("| stride k | OOF metric | s/study (test chain) | of which stage 1 |")
    print("|---|---|---|---|")
    for k, metric, total, stage1, _ in rows:
        print(f"| {k} | {metric:.4f} | {total:.2f} | {stage1:.2f} |")


if __name__ == "__main__":
    main()
