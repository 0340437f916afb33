"""Predict with a stage's trained fold runs: ``python inference.py --CFG config/<pipeline>/<stage>.yaml [--split oof|test] [--data-dir D] [--out F] [key=value ...]``.

Generic over stages: the run's config comes from its checkpoint, the registered dataset builds
the rows, and predictions stream batch by batch to a writer the dataset supplies (a CSV of its
key and output columns by default), so nothing grows with the data set.

``--split oof`` (default): each training case predicted by the fold model that did not train on
it -> ``<output_dir>/<pipeline>/<exp>/preds_oof.csv`` (reused while newer than every checkpoint
and input); then the pipeline's ``after_oof`` report for that stage, if it has one
(``utils/<pipeline>/report.py``), which adds its row to the experiment log (utils/experiments.py).

``--split test``: the pipeline's test-time chain on ``--data-dir`` when it has one
(``utils/<pipeline>/submit.py``, e.g. the whole chain -> submission.csv), else this stage's
fold-mean predictions on the data set's test rows. Intermediates go to ``<output_dir>/<pipeline>/test/<data folder>-<hash>/``, never into the
training products; ``--out`` sets the submission / prediction file or folder (default: in that
folder).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from utils import cli, experiments, paths
from utils.config import Config
from utils.engine import resolve_device
from utils.errors import InputError
from utils.folds import load_folds, with_folds
from utils.predict import is_fresh, load_models, predict_to, run_config
from utils.registry import DATASETS, load_pipeline

log = logging.getLogger("inference")


def oof_predictions(run: Config, id_col: str) -> Path:
    """Write the stage's out-of-fold predictions; returns their path."""
    dataset = DATASETS.get(run.dataset.name)
    out = paths.preds_csv(run)
    if is_fresh(out, run, dataset.oof_inputs(run)):
        log.info("%s is newer than every checkpoint and input: reusing it", out)
        return out
    folds = load_folds(paths.folds_csv(run), id_col)
    table = with_folds(dataset.oof_table(run), folds, id_col)
    models = load_models(run)
    missing = sorted(set(folds["fold"]) - set(models))
    if missing:
        raise InputError(
            f"'{run.exp_name}' has no trained model for folds {missing}: OOF would be incomplete"
        )
    with dataset.make_writer(run, out, table) as writer:
        for k in sorted(models):
            predict_to(writer, run, [models[k]], table[table["fold"] == k])
    log.info(
        "%s OOF: %d rows of %d cases -> %s", run.exp_name, len(table), table[id_col].nunique(), out
    )
    return out


def test_predictions(run: Config, out: Path) -> Path:
    """Fold-mean predictions of one stage on the test rows its dataset finds in ``data_dir``."""
    dataset = DATASETS.get(run.dataset.name)
    table = dataset.test_table(run)
    with dataset.make_writer(run, out, table) as writer:
        predict_to(writer, run, load_models(run).values(), table)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument(
        "--data-dir", default=None, help="data folder (default: the config's data_dir)"
    )
    parser.add_argument("--split", default="oof", choices=["oof", "test"])
    parser.add_argument("--out", type=Path, default=None, help="output file of --split test")
    args = parser.parse_args(argv)
    with cli.running():
        cfg = cli.load(args, [f"data_dir={args.data_dir}"] if args.data_dir else [])
        pipeline = load_pipeline(cfg.pipeline)
        if args.split == "test":
            if pipeline.test is not None:
                out = pipeline.test(cfg, args.out)
            else:
                out = test_predictions(run_config(cfg), args.out or paths.test_preds_csv(cfg))
            print(f"test predictions: {out}")
            return
        start = time.perf_counter()
        run = run_config(cfg)
        oof_predictions(run, pipeline.id_col)
        report = pipeline.after_oof(run) if pipeline.after_oof is not None else None
        if report is not None:
            seconds, device = time.perf_counter() - start, resolve_device(cfg.device)
            experiments.log_report(run, experiments.Invocation.of(args), report, seconds, device)
    print(report.summary if report else f"OOF predictions: {paths.preds_csv(run)}")


if __name__ == "__main__":
    main()
