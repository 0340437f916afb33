"""RSNA 2022 competition metric: weighted log loss over ``patient_overall`` and C1..C7.

Weights (host clarification): ``patient_overall`` 14 if fractured else 7, each vertebra 2 / 1.
Predictions are clipped to [1e-15, 1 - 1e-15]. The primary (per-study) score averages each
study's weight-normalised loss, as the mle-bench grader does; the global variant divides the
total weighted loss by the total weight (the competition's own definition, which the public
grader reads per study).

Frames come in two layouts:

- wide: ``StudyInstanceUID`` + the 8 ``TARGETS`` columns, one row per study;
- long: ``row_id,fractured`` with ``row_id = <StudyInstanceUID>_<target>`` (Kaggle submission).

Usage::

    python -m utils.rsna.metric SUBMISSION_CSV ANSWERS_CSV [--global]

ANSWERS_CSV is ``row_id,fractured`` or a train.csv-schema table. Prints the per-study and global
scores and the per-target log losses; the last line is the primary score alone. Invalid input
ends with one ``error: <message>`` line and exit status 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from utils import cli
from utils.errors import InputError
from utils.io import read_csv

UID = "StudyInstanceUID"
ROW_ID = "row_id"
VALUE = "fractured"
VERTEBRAE = [f"C{i}" for i in range(1, 8)]
TARGETS = ["patient_overall", *VERTEBRAE]
# (weight if fractured, weight if not), per target.
WEIGHTS = {"patient_overall": (14.0, 7.0), **{v: (2.0, 1.0) for v in VERTEBRAE}}
EPS = 1e-15

_POS_W = np.array([WEIGHTS[t][0] for t in TARGETS])
_NEG_W = np.array([WEIGHTS[t][1] for t in TARGETS])


# ---- input checks -------------------------------------------------------------------------------
def _examples(values: Sequence | np.ndarray | pd.Index, k: int = 3) -> str:
    """First ``k`` of the sorted ``values`` as ``a, b, c, ...`` (deterministic error messages)."""
    items = sorted(map(str, values))
    return ", ".join(items[:k]) + (", ..." if len(items) > k else "")


def _require_columns(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{name}: missing columns {missing} (has {list(df.columns)})")


def _require_unique(ids: pd.Series, name: str) -> None:
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise InputError(f"{name}: {len(dup)} duplicated {ids.name} values (e.g. {_examples(dup)})")


def _numeric_values(
    df: pd.DataFrame, ids: pd.Series, columns: Sequence[str], name: str
) -> np.ndarray:
    """``df[columns]`` as float64 (N, len(columns)); raises naming non-numeric entries."""
    for col in columns:
        if not pd.api.types.is_numeric_dtype(df[col]):
            coerced = pd.to_numeric(df[col], errors="coerce")
            unparsable = df[col].notna() & coerced.isna()
            # Numbers stored as text parse fine but are still the wrong type: show any entry.
            bad = unparsable if unparsable.any() else df[col].notna()
            shown = [f"{i}={v!r}" for i, v in zip(ids[bad], df.loc[bad, col], strict=True)]
            raise InputError(
                f"{name}: column {col!r} is not numeric (dtype {df[col].dtype}; "
                f"e.g. {_examples(shown)})"
            )
    return df[list(columns)].to_numpy(np.float64)


def _cell_names(ids: pd.Series, columns: Sequence[str], mask: np.ndarray) -> list[str]:
    """Readable names of the True cells of ``mask`` (N, C): ``id`` or ``id[column]``."""
    rows, cols = np.nonzero(mask)
    id_values = ids.to_numpy(object)
    if len(columns) == 1:
        return [str(id_values[r]) for r in rows]
    return [f"{id_values[r]}[{columns[c]}]" for r, c in zip(rows, cols, strict=True)]


def _check_probabilities(
    df: pd.DataFrame, ids: pd.Series, columns: Sequence[str], name: str
) -> np.ndarray:
    """Probabilities as float64 (N, C); raises on non-numeric, NaN or values outside [0, 1]."""
    values = _numeric_values(df, ids, columns, name)
    nan = np.isnan(values)
    if nan.any():
        cells = _cell_names(ids, columns, nan)
        raise InputError(f"{name}: {len(cells)} NaN predictions (e.g. {_examples(cells)})")
    outside = (values < 0) | (values > 1)
    if outside.any():
        cells = _cell_names(ids, columns, outside)
        raise InputError(
            f"{name}: {len(cells)} predictions outside [0, 1] (e.g. {_examples(cells)})"
        )
    return values


def _check_labels(
    df: pd.DataFrame, ids: pd.Series, columns: Sequence[str], name: str
) -> np.ndarray:
    """Binary labels as float64 (N, C); raises on anything but 0 and 1 (NaN included)."""
    values = _numeric_values(df, ids, columns, name)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        cells = _cell_names(ids, columns, bad)
        raise InputError(f"{name}: {len(cells)} labels are not 0/1 (e.g. {_examples(cells)})")
    return values


def _set_difference_message(
    left: pd.Index, right: pd.Index, what: str, lname: str, rname: str
) -> str | None:
    """One-line description of how the id sets differ, or None when they are equal."""
    missing, extra = right.difference(left), left.difference(right)
    parts = []
    if len(missing):
        parts.append(f"{len(missing)} {what} missing from {lname} (e.g. {_examples(missing)})")
    if len(extra):
        parts.append(f"{len(extra)} {what} in {lname} not in {rname} (e.g. {_examples(extra)})")
    return "; ".join(parts) or None


def _aligned(pred: pd.DataFrame, truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Validated wide frames -> (probabilities, labels), both float64 (N, 8) in truth row order."""
    for df, name in ((pred, "pred"), (truth, "truth")):
        _require_columns(df, [UID, *TARGETS], name)
        _require_unique(df[UID], name)
    if truth.empty:
        raise InputError("truth: no studies to score")
    diff = _set_difference_message(
        pd.Index(pred[UID]), pd.Index(truth[UID]), "studies", "pred", "truth"
    )
    if diff:
        raise InputError(f"pred and truth study sets differ: {diff}")
    pred = pred.set_index(UID).loc[truth[UID]].reset_index()
    p = _check_probabilities(pred, pred[UID], TARGETS, "pred")
    y = _check_labels(truth, truth[UID], TARGETS, "truth")
    return p, y


# ---- the metric ---------------------------------------------------------------------------------
def _weights(y: np.ndarray) -> np.ndarray:
    """Metric weight of each cell of the labels ``y`` (N, 8) -> float64 (N, 8)."""
    return np.where(y == 1, _POS_W, _NEG_W)


def _logloss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise binary log loss (nats) of clipped probabilities ``p`` against labels ``y``."""
    p = np.clip(p, EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def score(pred: pd.DataFrame, truth: pd.DataFrame, per_study: bool = True) -> float:
    """Competition score (nats, lower is better) of wide ``pred`` probabilities against ``truth``.

    Both frames: ``StudyInstanceUID`` + ``TARGETS`` columns, one row per study, any row order;
    the study sets must be equal. ``per_study=True``: mean over studies of
    sum_j w_ij l_ij / sum_j w_ij (primary); ``False``: sum_ij w_ij l_ij / sum_ij w_ij.
    """
    p, y = _aligned(pred, truth)
    w = _weights(y)
    wl = w * _logloss(p, y)
    if per_study:
        return float(np.mean(wl.sum(axis=1) / w.sum(axis=1)))
    return float(wl.sum() / w.sum())


def per_target_logloss(pred: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """Weighted mean log loss of each target column: sum_i w_ij l_ij / sum_i w_ij (nats).

    Uses the metric's weights within the column, so the global score is the average of these
    values weighted by each column's total weight.
    """
    p, y = _aligned(pred, truth)
    w = _weights(y)
    losses = (w * _logloss(p, y)).sum(axis=0) / w.sum(axis=0)
    return dict(zip(TARGETS, losses.tolist(), strict=True))


def per_target_auc(pred: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float | None]:
    """ROC AUC of each target column; None for a target whose truth has a single class."""
    p, y = _aligned(pred, truth)
    return {
        t: float(roc_auc_score(y[:, j], p[:, j])) if len(np.unique(y[:, j])) == 2 else None
        for j, t in enumerate(TARGETS)
    }


def constant_prior_baseline(
    truth_train: pd.DataFrame, truth_eval: pd.DataFrame, per_study: bool = True
) -> float:
    """Score on ``truth_eval`` of predicting each target's prevalence in ``truth_train``.

    Both are wide label frames (train.csv schema). The reference for any CV number.
    """
    _require_columns(truth_train, [UID, *TARGETS], "truth_train")
    _require_columns(truth_eval, [UID, *TARGETS], "truth_eval")
    labels = _check_labels(truth_train, truth_train[UID], TARGETS, "truth_train")
    if not len(labels):
        raise InputError("truth_train: no studies to take prevalences from")
    prior = labels.mean(axis=0)
    pred = pd.DataFrame(np.broadcast_to(prior, (len(truth_eval), len(TARGETS))), columns=TARGETS)
    pred.insert(0, UID, truth_eval[UID].to_numpy())
    return score(pred, truth_eval, per_study=per_study)


def noisy_or(probs_c1_c7: np.ndarray) -> np.ndarray:
    """P(any vertebra fractured) = 1 - prod_j (1 - p_j) for independent per-vertebra probabilities.

    ``probs_c1_c7``: (..., 7) probabilities in [0, 1]; returns (...,) float64.
    """
    p = np.asarray(probs_c1_c7, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] != len(VERTEBRAE):
        raise InputError(f"noisy_or expects (..., 7) vertebra probabilities, got shape {p.shape}")
    # Through log1p/expm1 so that many small probabilities do not lose precision; log1p(-1) = -inf
    # is exact here (a certain fracture gives exactly 1).
    with np.errstate(divide="ignore"):
        return -np.expm1(np.log1p(-p).sum(axis=-1))


# ---- long (submission) format -------------------------------------------------------------------
def long_to_wide(df: pd.DataFrame) -> pd.DataFrame:
    """``row_id,fractured`` (8 rows per study) -> wide ``StudyInstanceUID`` + ``TARGETS``.

    The study is ``row_id`` up to its first ``_`` (UIDs hold dots, never underscores; the target
    ``patient_overall`` holds one), as the graders split it. Rows sorted by study.
    """
    _require_columns(df, [ROW_ID, VALUE], "long frame")
    _require_unique(df[ROW_ID], "long frame")
    parts = df[ROW_ID].astype(str).str.split("_", n=1, expand=True).reindex(columns=[0, 1])
    uid, target = parts[0], parts[1]
    unknown = ~target.isin(TARGETS)
    if unknown.any():
        raise InputError(
            f"long frame: {int(unknown.sum())} row_ids do not end in _<target> with a target in "
            f"{TARGETS} (e.g. {_examples(df.loc[unknown, ROW_ID])})"
        )
    counts = uid.value_counts()
    incomplete = counts.index[counts < len(TARGETS)]
    if len(incomplete):
        raise InputError(
            f"long frame: {len(incomplete)} studies lack rows for some targets "
            f"(e.g. {_examples(incomplete)})"
        )
    long = pd.DataFrame({UID: uid, "target": target, VALUE: df[VALUE].to_numpy()})
    wide = long.pivot(index=UID, columns="target", values=VALUE)
    return wide.reindex(columns=TARGETS).rename_axis(columns=None).reset_index()


def wide_to_long(df: pd.DataFrame) -> pd.DataFrame:
    """Wide ``StudyInstanceUID`` + ``TARGETS`` -> ``row_id,fractured``, 8 rows per study.

    Rows follow the input's study order, targets in ``TARGETS`` order within a study.
    """
    _require_columns(df, [UID, *TARGETS], "wide frame")
    _require_unique(df[UID], "wide frame")
    uids = np.repeat(df[UID].astype(str).to_numpy(object), len(TARGETS))
    targets = np.tile(np.array(TARGETS, dtype=object), len(df))
    return pd.DataFrame({ROW_ID: uids + "_" + targets, VALUE: df[TARGETS].to_numpy().reshape(-1)})


def truth_to_long(train_like_df: pd.DataFrame) -> pd.DataFrame:
    """train.csv-schema labels -> answers ``row_id,fractured`` (int 0/1), 8 rows per study."""
    _require_columns(train_like_df, [UID, *TARGETS], "truth")
    labels = _check_labels(train_like_df, train_like_df[UID], TARGETS, "truth")
    wide = pd.DataFrame(labels.astype(np.int64), columns=TARGETS)
    wide.insert(0, UID, train_like_df[UID].to_numpy())
    return wide_to_long(wide)


def validate_submission(sub: pd.DataFrame, answers: pd.DataFrame) -> None:
    """The grader's checks on a long submission; raises ValueError with a one-line reason.

    Required columns ``row_id,fractured``; unique row_ids; the same row_id set as ``answers``;
    ``fractured`` numeric, no NaN, within [0, 1].
    """
    _require_columns(sub, [ROW_ID, VALUE], "submission")
    _require_columns(answers, [ROW_ID, VALUE], "answers")
    _require_unique(sub[ROW_ID], "submission")
    _require_unique(answers[ROW_ID], "answers")
    diff = _set_difference_message(
        pd.Index(sub[ROW_ID].astype(str)),
        pd.Index(answers[ROW_ID].astype(str)),
        "row_ids",
        "submission",
        "answers",
    )
    if diff:
        counts = f"{len(sub)} vs {len(answers)} rows"
        raise InputError(f"submission row_ids differ from the answers ({counts}): {diff}")
    _check_probabilities(sub, sub[ROW_ID], [VALUE], "submission")


def score_submission(
    sub_long: pd.DataFrame, answers_long: pd.DataFrame, per_study: bool = True
) -> float:
    """Validate a long submission against long answers, then score it (see ``score``)."""
    validate_submission(sub_long, answers_long)
    return score(long_to_wide(sub_long), long_to_wide(answers_long), per_study=per_study)


def read_answers(path: str) -> pd.DataFrame:
    """Answers CSV as ``row_id,fractured``: either that layout or a train.csv-schema table."""
    header = read_csv(path, nrows=0).columns
    if {UID, *TARGETS} <= set(header):
        return truth_to_long(read_csv(path, dtype={UID: str}))
    if {ROW_ID, VALUE} <= set(header):
        return read_csv(path, dtype={ROW_ID: str})
    raise InputError(
        f"{path}: answers need columns row_id,fractured or {UID},{','.join(TARGETS)} "
        f"(has {list(header)})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("submission", help="submission CSV: row_id,fractured")
    parser.add_argument("answers", help="answers CSV: row_id,fractured or train.csv schema")
    parser.add_argument(
        "--global", dest="use_global", action="store_true", help="last line = the global score"
    )
    args = parser.parse_args(argv)
    with cli.running():
        sub = read_csv(args.submission, dtype={ROW_ID: str})
        answers = read_answers(args.answers)
        validate_submission(sub, answers)
        pred, truth = long_to_wide(sub[[ROW_ID, VALUE]]), long_to_wide(answers)
        scores = {"per_study": score(pred, truth), "global": score(pred, truth, per_study=False)}
        losses = per_target_logloss(pred, truth)
    for name, value in scores.items():
        print(f"{name} {value:.6f}")
    for target, value in losses.items():
        print(f"logloss {target} {value:.6f}")
    print(f"{scores['global' if args.use_global else 'per_study']:.6f}")


if __name__ == "__main__":
    main()
