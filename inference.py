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
fold-mean predictions on the data set's test rows.

An ensemble config (``ensemble: [...]``, utils/ensemble.py) predicts each member as above, then
combines the members' predictions: OOF row by row (fold k from every member's fold-k model), test
with the weights its OOF pass recorded. Intermediates go to ``<output_dir>/<pipeline>/test/<data folder>-<hash>/``, never into the
training products; ``--out`` sets the submission / prediction file or folder (default: in that
folder).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from utils import cli, ensemble, experiments, paths
from utils.config import Config
from utils.engine import resolve_device
from utils.errors import InputError
from utils.folds import load_folds, with_folds
from utils.io import write_csv
from utils.predict import is_fresh, load_models, predict_to, read_predictions, run_config
from utils.registry import DATASETS, load_pipeline

log = logging.getLogger("inference")


def oof_predictions(run: Config, id_col: str) -> Path:
    """Write the stage's out-of-fold predictions (an ensemble's: its members' first); returns
    their path."""
    if run.get("ensemble"):
        for member in ensemble.members_of(run):
            oof_predictions(run_config(run, member.exp), id_col)
        return ensemble.write_oof(run)
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


def test_predictions(run: Config, out: Path, id_col: str) -> Path:
    """Fold-mean predictions of one stage on the test rows its dataset finds in ``data_dir``;
    an ensemble's members each write theirs beside it, then their weighted mean goes to ``out``."""
    if run.get("ensemble"):
        members = ensemble.test_members(run)
        frames = [
            read_predictions(test_predictions(m, paths.test_preds_csv(m), id_col), id_col)
            for m, _ in members
        ]
        dataset = DATASETS.get(members[0][0].dataset.name)
        return write_csv(ensemble.combine(dataset, frames, [w for _, w in members]), out)
    dataset = DATASETS.get(run.dataset.name)
    table = dataset.test_table(run)
    with dataset.make_writer(run, out, table) as writer:
        predict_to(writer, run, load_models(run).values(), table)
    return out


def stage_config(cfg: Config) -> Config:
    """What predicts: the trained run's own config, or an ensemble's config as given."""
    return cfg if cfg.ensemble else run_config(cfg)


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
                out = args.out or paths.test_preds_csv(cfg)
                out = test_predictions(stage_config(cfg), out, pipeline.id_col)
            print(f"test predictions: {out}")
            return
        start = time.perf_counter()
        run = stage_config(cfg)
        oof_predictions(run, pipeline.id_col)
        report = pipeline.after_oof(run) if pipeline.after_oof is not None else None
        if report is not None:
            seconds = time.perf_counter() - start
            device = experiments.device_name(resolve_device(cfg.device))
            experiments.log_report(run, experiments.Invocation.of(args), report, seconds, device)
    print(report.summary if report else f"OOF predictions: {paths.preds_csv(run)}")


if __name__ == "__main__":
    main()
