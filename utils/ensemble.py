"""Ensembles of experiments: one stage predicted by several trained experiments of its dataset.

An ensemble is a config whose ``ensemble`` key names member experiments,
``[{exp: NAME, weight: W}, ...]`` (weight 1 by default), in a stage file or on the command line.
Members may differ in anything their dataset and model take (backbone, image size, sequence
length ...) as long as they predict the same rows of the same dataset and select their
checkpoints on the same validation metric. Each keeps its own run folders and predictions; the
ensemble's own folder ``<output_dir>/<pipeline>/<exp>/`` gets

- ``preds_oof.csv`` (``inference.py --split oof``): the members' OOF predictions combined row by
  row, in the members' own format, so a downstream stage reads it like any stage's. Each row of
  fold k comes from every member's fold-k model (checked against the fold file: nothing leaks);
- ``ensemble.json``: the members, the weights a test-time run uses and the fit, if any.

``--split test`` combines the members' fold means with those weights. Members are combined on
their logits, whatever the prediction table holds (the dataset's ``ensemble_output`` and
``ensemble_logits``: a logit column as is, or a probability column turned back into its logit):
z = sum_i w_i z_i with the weights normalised to sum 1. One space for every stage keeps one
combination and one NNLS fit; a confident member counts as such, where a mean of probabilities
flattens it near 0 and 1; and a downstream stage that reads logits gets logits.

``python -m utils.ensemble fit --CFG FILE [key=value ...]`` chooses the weights on the OOF
predictions (``ensemble_fit.*``): ``hill``, greedy forward selection with replacement (Caruana et
al., 2004) on the members' validation metric (their ``train.best_metric``), or ``nnls``,
non-negative least squares of the labels as -1/+1 on the member logits (scipy.optimize.nnls;
only the weights' ratios matter, so the target's scale does not). The fit is nested by fold: the
OOF rows of fold k are combined with weights fitted on the other folds, so the CV it reports is
never scored on its own fit; the weights fitted on every fold are the test-time ones. It prints
each member, the plain mean and the fitted ensemble side by side and adds a row to the
experiment log; the CV reports show the same table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from utils import cli, experiments, paths
from utils.config import Config, ConfigError, thaw
from utils.datasets import StageDataset
from utils.errors import InputError
from utils.folds import load_folds
from utils.io import write_csv, write_text
from utils.predict import is_fresh, read_predictions, run_config, trained_folds
from utils.registry import DATASETS, load_pipeline

log = logging.getLogger(__name__)
METHODS = ("hill", "nnls")
METRIC_PREFIX = "val_"  # train.best_metric = "val_" + a key of the dataset's evaluate()


@dataclass(frozen=True)
class Member:
    """One configured member: its experiment and its weight (normalised when combined)."""

    exp: str
    weight: float


def members_of(cfg: Config) -> list[Member]:
    """The configured members, checked: ``{exp: NAME[, weight: W >= 0]}`` each, distinct, not
    the ensemble itself, weights summing above 0."""
    members = []
    for entry in cfg["ensemble"]:
        weight = entry.get("weight", 1.0) if isinstance(entry, Mapping) else None
        if (
            not isinstance(entry, Mapping)
            or not entry.get("exp")
            or set(entry) - {"exp", "weight"}
            or isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or weight < 0
        ):
            raise ConfigError(
                f"ensemble members are {{exp: NAME, weight: W >= 0}}, got {thaw(entry)!r}"
            )
        members.append(Member(str(entry["exp"]), float(weight)))
    names = [m.exp for m in members]
    if not members or len(set(names)) < len(names) or cfg["exp_name"] in names:
        raise ConfigError(
            f"ensemble {cfg['exp_name']!r} needs distinct members other than itself, got {names}"
        )
    if sum(m.weight for m in members) <= 0:
        raise ConfigError(f"ensemble {cfg['exp_name']!r}: the member weights sum to 0")
    return members


def normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    return w / w.sum()


# ---- the record -----------------------------------------------------------------------------------
def read_record(cfg: Config, exp: str | None = None) -> dict | None:
    """``<exp>/ensemble.json`` (default: the config's experiment), None when it has none."""
    path = paths.ensemble_json(cfg, exp)
    return json.loads(path.read_text()) if path.is_file() else None


def current_fit(cfg: Config, members: list[Member]) -> dict | None:
    """The saved fit when it was made on these members (and on their current OOF predictions)."""
    record = read_record(cfg)
    if record is None or record["fit"] is None:
        return None
    if record["members"] != [asdict(m) for m in members]:
        log.warning(
            "%s was fitted on other members: the configured weights apply (refit with "
            "python -m utils.ensemble fit)",
            paths.ensemble_json(cfg),
        )
        return None
    fitted = paths.ensemble_json(cfg).stat().st_mtime
    newer = [m.exp for m in members if paths.preds_csv(cfg, m.exp).stat().st_mtime > fitted]
    if newer:
        raise InputError(
            f"the weights in {paths.ensemble_json(cfg)} were fitted before the OOF predictions of "
            f"{newer} changed: refit (python -m utils.ensemble fit --CFG ...)"
        )
    return record["fit"]


# ---- the members' OOF predictions -----------------------------------------------------------------
@dataclass(frozen=True)
class OofSet:
    """The members' OOF predictions of one stage, aligned row by row."""

    names: list[str]  # member experiments (M)
    dataset: type[StageDataset]
    rows: pd.DataFrame  # (N, key columns + fold) in the first member's order
    table: pd.DataFrame  # (N, ...) the stage's OOF rows with their labels, in that order
    logits: np.ndarray  # (N, M) float64: member m's ``ensemble_output`` on row n
    metric: str  # the members' train.best_metric
    mode: str  # min | max

    @property
    def folds(self) -> np.ndarray:
        return self.rows["fold"].to_numpy()

    def score(self, z: np.ndarray, rows: np.ndarray | None = None) -> float:
        """The members' validation metric of logits ``z``, one per row of ``rows`` (a bool mask
        over the N rows; None: all of them)."""
        table = self.table if rows is None else self.table[rows]
        outputs = {self.dataset.ensemble_output: z}
        return float(self.dataset.evaluate(outputs, table)[self.evaluate_key])

    @property
    def evaluate_key(self) -> str:
        return self.metric.removeprefix(METRIC_PREFIX)

    def combine(self, weights: np.ndarray) -> np.ndarray:
        """Weighted mean logits (N,): ``weights`` (M,) for every row or (N, M) per row."""
        w = np.broadcast_to(weights, self.logits.shape)
        return (self.logits * w).sum(axis=1) / w.sum(axis=1)

    def frame(self, z: np.ndarray) -> pd.DataFrame:
        """Logits ``z`` (N,) as the members' prediction table (key + output columns + fold)."""
        return prediction_frame(self.dataset, self.rows, z)


def prediction_frame(
    dataset: type[StageDataset], rows: pd.DataFrame, z: np.ndarray
) -> pd.DataFrame:
    """``rows``' key columns, the output columns of logits ``z`` (N,), and ``fold`` if it has one."""
    block = dataset.prediction_block(rows, {dataset.ensemble_output: z})
    if "fold" in rows:
        block["fold"] = rows["fold"].to_numpy()
    return block


def stage_of(runs: Sequence[Config]) -> type[StageDataset]:
    """The dataset the member runs share; they must select checkpoints on the same metric."""
    names = {(r.dataset.name, r.train.best_metric, r.train.best_mode) for r in runs}
    if len(names) > 1:
        raise ConfigError(
            "ensemble members must share the dataset and train.best_metric/best_mode, got "
            + ", ".join(f"{r.exp_name}: {r.dataset.name} {r.train.best_metric}" for r in runs)
        )
    dataset = DATASETS.get(runs[0].dataset.name)
    if dataset.ensemble_output is None or dataset.label_column is None:
        raise ConfigError(f"dataset {runs[0].dataset.name} declares no ensemble_output")
    if not runs[0].train.best_metric.startswith(METRIC_PREFIX):
        raise ConfigError(
            f"ensembles are fitted and scored on the members' train.best_metric, which must be "
            f"a metric of the dataset's evaluate (val_*), got {runs[0].train.best_metric}"
        )
    return dataset


def positions(keys: pd.DataFrame, of: pd.DataFrame) -> np.ndarray | None:
    """Row positions in ``of`` of each row of ``keys`` (same columns), None unless both hold
    exactly the same rows."""
    pos = pd.MultiIndex.from_frame(of).get_indexer(pd.MultiIndex.from_frame(keys))
    return None if len(of) != len(keys) or (pos < 0).any() else pos


def load_oof(cfg: Config, names: Sequence[str]) -> OofSet:
    """The OOF predictions of members ``names``, each checked to be current and out of fold."""
    id_col = load_pipeline(cfg.pipeline).id_col
    runs = [run_config(cfg, name) for name in names]
    dataset = stage_of(runs)
    folds = load_folds(paths.folds_csv(cfg), id_col).set_index(id_col)["fold"]
    keys = list(dataset.key_columns)
    rows, logits = None, []
    for run in runs:
        path = paths.preds_csv(run)
        if not is_fresh(path, run, dataset.oof_inputs(run)):
            raise InputError(
                f"{path} is missing or older than its runs or inputs: run inference.py --split "
                "oof on the ensemble (it predicts its members first)"
            )
        preds = read_predictions(path, id_col)
        if not np.array_equal(preds["fold"], folds.reindex(preds[id_col]).to_numpy()):
            raise InputError(
                f"{path}: some rows were not predicted by the model of their fold in "
                f"{paths.folds_csv(cfg)}: predict '{run.exp_name}' out of fold again"
            )
        rows = preds[[*keys, "fold"]] if rows is None else rows
        pos = positions(rows[keys], preds[keys])
        if pos is None:
            raise InputError(
                f"'{run.exp_name}' predicted other rows than '{runs[0].exp_name}': ensemble "
                "members predict the same rows of one stage"
            )
        logits.append(dataset.ensemble_logits(preds.iloc[pos]))
    table = dataset.oof_table(runs[0])
    pos = positions(rows[keys], table[keys])
    if pos is None:
        raise InputError(f"the members' OOF rows are not the rows of {dataset.__name__}")
    return OofSet(
        names=list(names),
        dataset=dataset,
        rows=rows.reset_index(drop=True),
        table=table.iloc[pos].reset_index(drop=True),
        logits=np.stack(logits, axis=1),
        metric=runs[0].train.best_metric,
        mode=runs[0].train.best_mode,
    )


# ---- weights ------------------------------------------------------------------------------------
def hill_climb(
    score: Callable[[np.ndarray], float], logits: np.ndarray, rounds: int, mode: str
) -> np.ndarray:
    """Greedy forward selection with replacement: ``rounds`` times, add the member whose
    addition scores best (the first round takes the best single member); the weights (M,) are
    the counts of the best-scoring bag seen, normalised (equal when no score is a number, e.g.
    an AUC on rows of one class). ``logits`` (N, M)."""
    n_members = logits.shape[1]
    sign = 1.0 if mode == "min" else -1.0
    counts = np.zeros(n_members)
    best, best_counts = np.inf, None
    for _ in range(rounds):
        trials = [
            sign * score(logits @ normalised(counts + np.eye(n_members)[i]))
            for i in range(n_members)
        ]
        i = int(np.argmin(trials))
        counts[i] += 1
        if trials[i] < best:
            best, best_counts = trials[i], counts.copy()
    return np.full(n_members, 1 / n_members) if best_counts is None else normalised(best_counts)


def nnls_weights(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``label`` (N,) 0/1 as -1/+1 on ``logits`` (N, M), normalised
    (equal weights when every member gets 0)."""
    w, _ = nnls(logits, 2.0 * label - 1.0)
    return normalised(w) if w.sum() > 0 else np.full(logits.shape[1], 1 / logits.shape[1])


def fit_weights(s: OofSet, rows: np.ndarray, method: str, rounds: int) -> np.ndarray:
    """Member weights (M,) fitted on the OOF rows ``rows`` (bool mask) only."""
    if method == "nnls":
        return nnls_weights(s.logits[rows], s.table[s.dataset.label_column].to_numpy()[rows])
    return hill_climb(lambda z: s.score(z, rows), s.logits[rows], rounds, s.mode)


def nested_fit(s: OofSet, method: str, rounds: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """(fold -> weights fitted on the other folds, weights fitted on every fold)."""
    if method not in METHODS:
        raise ConfigError(f"ensemble_fit.method must be one of {METHODS}, got {method!r}")
    if int(rounds) < 1:
        raise ConfigError(f"ensemble_fit.rounds must be at least 1, got {rounds}")
    folds = s.folds
    per_fold = {int(k): fit_weights(s, folds != k, method, int(rounds)) for k in np.unique(folds)}
    return per_fold, fit_weights(s, np.ones(len(folds), bool), method, int(rounds))


def row_weights(s: OofSet, record: dict) -> np.ndarray:
    """(N, M) weights of each OOF row: its fold's nested fit, else the configured weights."""
    if record["fit"] is None:
        configured = normalised([m["weight"] for m in record["members"]])
        return np.broadcast_to(configured, s.logits.shape)
    per_fold = record["fit"]["fold_weights"]
    return np.stack([[per_fold[str(k)][n] for n in s.names] for k in s.folds])


# ---- OOF, fit, test -----------------------------------------------------------------------------
def by_name(names: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    return {n: float(w) for n, w in zip(names, weights, strict=True)}


def make_record(s: OofSet, members: list[Member], fit: dict | None) -> dict:
    """``ensemble.json``: the members as configured, the test-time weights (fitted on every
    fold, else the configured ones normalised), the fit."""
    configured = by_name(s.names, normalised([m.weight for m in members]))
    return {
        "metric": s.metric,
        "mode": s.mode,
        "members": [asdict(m) for m in members],
        "weights": fit["weights"] if fit else configured,
        "fit": fit,
    }


def write_oof(cfg: Config) -> Path:
    """The ensemble's OOF predictions and record from its members' (their OOF must be current)."""
    members = members_of(cfg)
    if trained_folds(cfg):
        raise ConfigError(
            f"'{cfg.exp_name}' holds trained folds in {paths.exp_dir(cfg)}: give the ensemble "
            "its own exp_name"
        )
    s = load_oof(cfg, [m.exp for m in members])
    record = make_record(s, members, current_fit(cfg, members))
    out = write_csv(s.frame(s.combine(row_weights(s, record))), paths.preds_csv(cfg))
    write_text(json.dumps(record, indent=2) + "\n", paths.ensemble_json(cfg))
    log.info("ensemble %s of %s: OOF -> %s", cfg.exp_name, s.names, out)
    return out


def fit(cfg: Config) -> dict:
    """Fit the weights (``ensemble_fit.*``, nested by fold), save them in the ensemble's record
    and write its OOF predictions with them; returns the record."""
    members = members_of(cfg)
    s = load_oof(cfg, [m.exp for m in members])
    method, rounds = cfg.ensemble_fit.method, cfg.ensemble_fit.rounds
    per_fold, weights = nested_fit(s, method, rounds)
    fitted = {
        "method": method,
        "rounds": int(rounds),
        "weights": by_name(s.names, weights),
        "fold_weights": {str(k): by_name(s.names, w) for k, w in per_fold.items()},
    }
    record = make_record(s, members, fitted)
    write_text(json.dumps(record, indent=2) + "\n", paths.ensemble_json(cfg))
    write_oof(cfg)  # with the nested weights just saved
    return record


@dataclass(frozen=True)
class Predictor:
    """One line of an ensemble's table: a member, the plain mean or the ensemble itself."""

    name: str
    weight: float | None  # a member's test-time weight; None for the mean and the ensemble
    frame: pd.DataFrame  # its OOF predictions: key columns + output columns + fold
    score: float  # the members' validation metric on them

    def row(self) -> dict:
        """Its line of a report: name, weight, score."""
        return {"name": self.name, "weight": self.weight, "score": self.score}


def predictors(cfg: Config, exp: str | None = None) -> tuple[str, list[Predictor]]:
    """(metric name, [each member, ``mean`` (equal weights), ``exp`` with the weights it uses
    (nested fit or configured)]) on the OOF predictions of ensemble ``exp``."""
    exp = exp or cfg.exp_name
    record = read_record(cfg, exp)
    if record is None:
        raise InputError(f"{paths.ensemble_json(cfg, exp)} not found: run its OOF pass first")
    s = load_oof(cfg, [m["exp"] for m in record["members"]])
    lines = [
        Predictor(n, record["weights"][n], s.frame(s.logits[:, i]), s.score(s.logits[:, i]))
        for i, n in enumerate(s.names)
    ]
    for name, weights in (("mean", np.ones(len(s.names))), (exp, row_weights(s, record))):
        z = s.combine(weights)
        lines.append(Predictor(name, None, s.frame(z), s.score(z)))
    return s.metric, lines


def test_members(cfg: Config, exp: str | None = None) -> list[tuple[Config, float]]:
    """(run config, test-time weight) of each member of ``exp`` (default: the config's own) as
    its record lists them; a trained stage is its own single member."""
    exp = exp or cfg.exp_name
    record = read_record(cfg, exp)
    if record is None:
        if exp == cfg.exp_name and cfg.get("ensemble"):
            raise InputError(
                f"{paths.ensemble_json(cfg)} not found: run inference.py --split oof on it first"
            )
        return [(run_config(cfg, exp), 1.0)]
    if (
        exp == cfg.exp_name
        and cfg.get("ensemble")
        and record["members"] != [asdict(m) for m in members_of(cfg)]
    ):
        raise InputError(
            f"{paths.ensemble_json(cfg)} lists other members than the config: run inference.py "
            "--split oof on the ensemble again"
        )
    return [(run_config(cfg, name), w) for name, w in record["weights"].items()]


def trained_exps(cfg: Config, exp: str) -> list[str]:
    """The experiments whose fold runs predict ``exp``: its members, or itself when trained."""
    record = read_record(cfg, exp)
    return [m["exp"] for m in record["members"]] if record else [exp]


def combine(
    dataset: type[StageDataset], frames: Sequence[pd.DataFrame], weights: Sequence[float]
) -> pd.DataFrame:
    """The weighted mean of members' prediction tables of the same rows (in any order), in the
    first one's row order; one table is returned as it is."""
    first = frames[0]
    if len(frames) == 1:
        return first
    keys = first[list(dataset.key_columns)]
    logits = []
    for frame in frames:
        pos = positions(keys, frame[list(dataset.key_columns)])
        if pos is None:
            raise InputError("ensemble members predicted different rows: they cannot be combined")
        logits.append(dataset.ensemble_logits(frame.iloc[pos]) if len(frame) else np.zeros(0))
    z = np.stack(logits, axis=1) @ normalised(weights)
    return prediction_frame(dataset, first, z)


def table_lines(metric: str, rows: list[dict], extra: Mapping[str, str] | None = None) -> list[str]:
    """The Markdown table of :func:`predictors` (their :meth:`Predictor.row`), plus the columns
    ``extra`` names (row key -> header) that a report adds to the rows."""
    extra = dict(extra or {})
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    return [
        "| predictor | test-time weight | OOF " + " | ".join([metric, *extra.values()]) + " |",
        "|---|" + "---:|" * (2 + len(extra)),
        *(
            f"| {r['name']} | " + " | ".join(fmt(r[k]) for k in ("weight", "score", *extra)) + " |"
            for r in rows
        ),
    ]


def report_section(e: Mapping, title: str, extra: Mapping[str, str] | None = None) -> list[str]:
    """A CV report's Markdown section on ensemble ``e`` (exp, fit, metric, rows), titled
    ``title`` (``{exp}`` is filled in): each member, the plain mean and the ensemble."""
    how = f"{e['fit']} fit, nested by fold" if e["fit"] else "the configured weights"
    return [
        "",
        "## " + title.format(exp=e["exp"]),
        "",
        f"Each member, the plain mean and the ensemble ({how}) on the same OOF rows.",
        "",
        *table_lines(e["metric"], e["rows"], extra),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg="config/<pipeline>/<ensemble>.yaml", commands=("fit",))
    args = parser.parse_intermixed_args(argv)
    with cli.running():
        start = time.perf_counter()
        cfg = cli.load(args)
        record = fit(cfg)
        metric, lines = predictors(cfg)
        table = "\n".join(table_lines(metric, [p.row() for p in lines]))
        name = "oof_" + metric.removeprefix(METRIC_PREFIX)
        result = experiments.CvResult(table, name, lines[-1].score, record["mode"])
        seconds = time.perf_counter() - start
        experiments.log_report(cfg, experiments.Invocation.of(args), result, seconds, "cpu")
    print(result.summary)


if __name__ == "__main__":
    main()
