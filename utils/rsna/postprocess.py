"""Final predictions -> what is submitted: calibration, then a plausibility check of the localisation.

The same three steps run in the OOF CV report (so their effect is measured) and in the test chain:

1. **Calibration** (``post.calibration: platt``): per target, ``p' = sigmoid(a * logit(p) + b)``
   fitted by logistic regression on the OOF predictions. The report scores cross-fitted values
   (each fold calibrated by the other folds' fit); the test chain applies the fit on every OOF
   study, saved as ``calibration.json`` beside the CV report.
2. **Prior matching** (``post.match_prior``): per target, one shift of every logit so the mean
   probability over the predicted studies equals the train prior. No label is used, so the
   report applies it to the OOF studies as the chain does to the test studies.
3. **Plausibility**: stage 2 only sees what stage-1 localisation hands it. A study whose
   vertebra ranges look unlike the training studies' (``plausibility.json``, saved by the report:
   a vertebra missing that they nearly always show, a range far shorter or longer than usual,
   ranges out of order) or a vertebra whose ratio peak is weak is where a model meets anatomy or
   an acquisition it has not learnt; there every affected logit is moved ``post.shrink`` of the
   way back to the train prior's logit, and the study is logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import brentq, minimize
from sklearn.linear_model import LogisticRegression

from utils.config import ConfigError
from utils.io import write_text
from utils.rsna.metric import TARGETS, UID, VERTEBRAE

log = logging.getLogger(__name__)
EPS = 1e-6
CALIBRATIONS = ("platt", "temperature", "platt_identity", "none")  # post.calibration


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


# ---- calibration --------------------------------------------------------------------------------
# Prior of the ``platt_identity`` fit: (a, b) ~ N((1, 0), IDENTITY_SD^2): with the demo's ~60
# studies the data may move the map a little; with the real 2,019 they dominate.
IDENTITY_SD = 0.5


def _fit_penalised(x: np.ndarray, y: np.ndarray, with_bias: bool) -> tuple[float, float]:
    """(a, b) minimising the summed log loss of ``sigmoid(a * x + b)``, plus the identity prior
    when ``with_bias`` (``platt_identity``); without it b = 0 and a alone is fitted
    (``temperature``: one scale of the logits, which keeps p = 0.5 fixed)."""

    def loss(theta: np.ndarray) -> float:
        a, b = theta[0], theta[1] if with_bias else 0.0
        z = a * x + b
        nll = float(np.sum(np.logaddexp(0, z) - y * z))
        return nll + float((a - 1) ** 2 + b**2) / (2 * IDENTITY_SD**2) if with_bias else nll

    theta = minimize(loss, np.array([1.0, 0.0] if with_bias else [1.0]), method="L-BFGS-B").x
    return float(theta[0]), float(theta[1]) if with_bias else 0.0


def fit_platt(
    wide: pd.DataFrame, truth: pd.DataFrame, method: str = "platt"
) -> dict[str, list[float]]:
    """Per target (a, b) of ``sigmoid(a * logit(p) + b)`` fitted on ``wide`` vs ``truth``.

    Both frames: UID + the 8 targets, rows in the same order. ``method``: ``platt`` (logistic
    regression, scikit-learn's default L2 pulls the slope toward 0, i.e. toward the prevalence),
    ``temperature`` (b = 0, one scale per target) or ``platt_identity`` (a and b pulled toward
    the identity map, :data:`IDENTITY_SD`). A target with one class only keeps the identity
    (1, 0): there is nothing to fit. A negative slope (the predictions rank these studies worse
    than chance) is not turned into a flipped ranking: the target then gets its smoothed
    prevalence (a = 0).
    """
    if method not in CALIBRATIONS:
        raise ConfigError(f"post.calibration must be one of {CALIBRATIONS}, got {method!r}")
    params = {}
    for t in TARGETS:
        y = truth[t].to_numpy(int)
        if y.min() == y.max() or method == "none":
            params[t] = [1.0, 0.0]
            continue
        x = _logit(wide[t].to_numpy())
        if method == "platt":
            model = LogisticRegression(C=1.0).fit(x[:, None], y)
            a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
        else:
            a, b = _fit_penalised(x, y, with_bias=method == "platt_identity")
        if a < 0:  # a ranking worse than chance on these studies: trust only the prevalence
            a, b = 0.0, float(_logit(np.array((y.sum() + 1) / (len(y) + 2))))
        params[t] = [a, b]
    return params


def apply_platt(wide: pd.DataFrame, params: Mapping[str, list[float]]) -> pd.DataFrame:
    """``wide`` with every target recalibrated by its (a, b)."""
    out = wide.copy()
    for t in TARGETS:
        a, b = params[t]
        out[t] = _sigmoid(a * _logit(wide[t].to_numpy()) + b)
    return out


def crossfit_platt(
    wide: pd.DataFrame, truth: pd.DataFrame, fold: np.ndarray, method: str = "platt"
) -> pd.DataFrame:
    """OOF-honest calibration: the rows of fold k calibrated by a fit on the other folds."""
    out = wide.copy()
    for k in np.unique(fold):
        rest = fold != k
        params = fit_platt(wide[rest], truth[rest], method)
        out.loc[~rest, TARGETS] = apply_platt(wide[~rest], params)[TARGETS].to_numpy()
    return out


# ---- prior matching -----------------------------------------------------------------------------
# Fewer studies than this say too little through their mean (Kaggle's public test set has 3):
# they are left as they are.
MATCH_MIN_STUDIES = 20


def match_prior(wide: pd.DataFrame, priors: Mapping[str, float]) -> pd.DataFrame:
    """``wide`` with each target's logits shifted by one constant: mean probability = train prior.

    Anatomy or an acquisition the models never saw moves the logits of every study together (on
    an independent phantom the demo chain gave its negatives patient_overall 0.84 on average);
    on studies like the training ones the mean is already near the prior and the shift near 0.
    Assumes the studies' prevalence is near the training studies' (a held-out split of the same
    population, as Kaggle's hidden test set; not a set selected for fractures). Fewer than
    :data:`MATCH_MIN_STUDIES` studies: unchanged.
    """
    if len(wide) < MATCH_MIN_STUDIES:
        return wide
    out, shifts = wide.copy(), {}
    for t in TARGETS:
        x = _logit(out[t].to_numpy())  # within +-13.8: the bracket below always holds a root
        shifts[t] = brentq(lambda b, x=x, t=t: _sigmoid(x + b).mean() - priors[t], -30.0, 30.0)
        out[t] = _sigmoid(x + shifts[t])
    log.info(
        "prior matching over %d studies, logit shift per target: %s",
        len(wide),
        " ".join(f"{t} {v:+.2f}" for t, v in shifts.items()),
    )
    return out


def save_json(content: Any, path: Path) -> Path:
    return write_text(json.dumps(content, indent=2), path)


# ---- plausibility -------------------------------------------------------------------------------
def reference(loc: pd.DataFrame) -> dict[str, dict[str, float]]:
    """What stage-1 localisation looks like on the training studies (from the OOF table).

    Per vertebra: the median range length (slices, ``length``), the median ratio peak (``peak``)
    and the share of studies where it was found (``presence``). Plausibility is judged against
    these, not against absolute numbers: a model's ratio scale and a data set's anatomy (C1 is
    one or two slices where the dens overlaps it) differ.
    """
    n = max(loc[UID].nunique(), 1)
    by = loc.groupby("vertebra")
    return {
        v: {
            "length": float(by["n_slices"].median().get(v, np.nan)),
            "peak": float(by["peak"].median().get(v, np.nan)),
            "presence": float(by[UID].nunique().get(v, 0) / n),
        }
        for v in VERTEBRAE
    }


def implausible(
    loc: pd.DataFrame,
    uids: list[str],
    min_peak: float,
    length_range: tuple[float, float],
    ref: Mapping[str, Mapping[str, float]],
) -> pd.DataFrame:
    """Which predictions to distrust: rows (UID, target, reason) for the studies ``uids``.

    ``loc``: the localisation table (utils/rsna/localize.py: StudyInstanceUID, vertebra, start,
    end, n_slices, peak, ...); ``ref``: :func:`reference` of the training studies. A study-level
    fault flags all 8 targets: a vertebra missing that the training studies nearly always show
    (presence >= 0.9), a range length outside ``length_range`` x its reference (after the study's
    own scale, the median of those ratios), ranges out of order. A peak below ``min_peak`` x its
    reference flags that vertebra and patient_overall.
    """
    rows = []
    by_study = dict(tuple(loc.groupby(UID, sort=False)))
    ref_len = pd.Series({v: ref[v]["length"] for v in VERTEBRAE})
    ref_peak = pd.Series({v: ref[v]["peak"] for v in VERTEBRAE})
    for uid in uids:
        study = by_study.get(uid)
        if study is None or study.empty:
            continue  # no vertebra found: every target is the prior already
        study = study.set_index("vertebra").reindex(VERTEBRAE)
        reasons = []
        missing = [
            v for v in VERTEBRAE if np.isnan(study.at[v, "start"]) and ref[v]["presence"] >= 0.9
        ]
        if missing:
            reasons.append(f"missing {','.join(missing)}")
        found = study.dropna(subset=["start"])
        rel = found["n_slices"] / ref_len[found.index]
        rel = rel / rel.median()
        odd = found.index[(rel < length_range[0]) | (rel > length_range[1])].tolist()
        if odd:
            reasons.append(f"range length {','.join(odd)}")
        if (np.diff(found["start"].to_numpy()) < 0).any():
            reasons.append("ranges out of order")
        if reasons:
            rows += [(uid, t, "; ".join(reasons)) for t in TARGETS]
            continue
        weak = found.index[found["peak"] < min_peak * ref_peak[found.index]].tolist()
        for v in weak:
            rows.append((uid, v, f"weak peak {v}"))
        if weak:
            rows.append((uid, "patient_overall", f"weak peak {','.join(weak)}"))
    return pd.DataFrame(rows, columns=[UID, "target", "reason"])


def shrink(
    wide: pd.DataFrame, flags: pd.DataFrame, priors: Mapping[str, float], factor: float
) -> pd.DataFrame:
    """``wide`` with each flagged (study, target) logit moved ``factor`` of the way to the prior's."""
    out = wide.set_index(UID)
    for (uid, target), _ in flags.groupby([UID, "target"]):
        prior = _logit(np.array(priors[target]))
        own = _logit(np.array(out.at[uid, target]))
        out.at[uid, target] = float(_sigmoid(own + factor * (prior - own)))
    for uid, group in flags.groupby(UID, sort=True):
        log.info("study %s: localisation implausible (%s): shrunk toward the prior", uid,
                 group["reason"].iloc[0])  # fmt: skip
    return out.reset_index()


def finalise(
    wide: pd.DataFrame,
    loc: pd.DataFrame,
    priors: Mapping[str, float],
    post: Mapping[str, Any],
    calibration: Mapping[str, list[float]] | None,
    ref: Mapping[str, Mapping[str, float]] | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test-time post-processing: (submitted predictions, the plausibility flags)."""
    if calibration is not None:
        wide = apply_platt(wide, calibration)
    if post["match_prior"]:
        wide = match_prior(wide, priors)
    if ref is None:
        return wide, pd.DataFrame(columns=[UID, "target", "reason"])
    flags = implausible(
        loc, wide[UID].tolist(), float(post["min_peak"]), tuple(post["length_range"]), ref
    )
    return shrink(wide, flags, priors, float(post["shrink"])), flags
