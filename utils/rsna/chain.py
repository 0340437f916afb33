"""RSNA 2022 chain and reports: what happens after a stage's OOF predictions, and at test time.

- after the stage-1 OOF pass: localisation plots of a few segmented studies (``viz/``);
- after the stage-2 or patient-head OOF pass: the CV report, which scores the whole pipeline
  (stage 2 + the patient head when its OOF predictions are current, else noisy-OR) against the
  constant-prior, noisy-OR and max baselines on the same studies;
- the test-time chain on ``data_dir``: cache the test studies (in the run's own test folder,
  never the training cache), stage-1 fold ensemble, localisation, stage-2 fold ensemble,
  patient head -> submission rows in test.csv order, columns row_id,fractured.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils import paths
from utils.budget import TimeGuard
from utils.config import Config, ConfigError
from utils.folds import load_folds
from utils.io import write_csv, write_text
from utils.plots import plot_calibration, plot_localisation
from utils.predict import load_models, predict_frame, read_predictions, run_config
from utils.rsna import layout
from utils.rsna.datasets import VERTEBRAE, study_logit_table, train_priors
from utils.rsna.dicom import StudyReadError
from utils.rsna.localize import COLUMNS as LOC_COLUMNS
from utils.rsna.localize import fill_skipped_slices, localize, strided_slices
from utils.rsna.metric import (
    TARGETS,
    UID,
    noisy_or,
    per_target_auc,
    per_target_logloss,
    score,
    validate_submission,
)
from utils.rsna.postprocess import (
    crossfit_platt,
    finalise,
    fit_platt,
    implausible,
    load_json,
    reference,
    save_json,
    shrink,
)
from utils.rsna.preprocess import check_cache_settings, process_study

log = logging.getLogger(__name__)
CLIP = 1e-6  # submission probabilities are kept inside [CLIP, 1 - CLIP]


def read_folds(cfg: Config) -> pd.DataFrame:
    return load_folds(paths.folds_csv(cfg), UID)


# ---- after the OOF passes -----------------------------------------------------------------------
def after_oof(run: Config) -> str | None:
    """The report for the stage whose OOF predictions were just written (see module docstring)."""
    stages = run.stages
    if run.exp_name == stages.vertebra:
        draw_localisation(run, read_predictions(paths.preds_csv(run), UID))
        return None
    if run.exp_name in (stages.fracture, stages.head):
        r = cv_report(run)
        return (
            f"OOF metric ({r['model']}): {r['oof_metric']:.4f} | constant-prior baseline: "
            f"{r['baseline_prior']:.4f} | ratio {r['ratio_to_prior']:.2f} | noisy-OR "
            f"{r['baseline_noisy_or']:.4f} | report: {paths.cv_report(run, 'md')}"
        )
    return None


def draw_localisation(cfg: Config, preds: pd.DataFrame) -> None:
    """Predicted ratio curves (truth dashed) and box for a few segmented studies."""
    labels_path = layout.stage1_labels_csv(paths.prep_dir(cfg))
    labels = (
        pd.read_csv(labels_path, dtype={UID: str})
        if labels_path.is_file()
        else pd.DataFrame(columns=["StudyInstanceUID"])
    )
    segmented = [u for u in labels["StudyInstanceUID"].unique() if u in set(preds.StudyInstanceUID)]
    for uid in segmented[: cfg.infer.viz_studies]:
        study = preds[preds.StudyInstanceUID == uid].merge(
            labels.loc[labels.StudyInstanceUID == uid, ["slice", *VERTEBRAE]].rename(
                columns={v: f"true_{v}" for v in VERTEBRAE}
            ),
            on="slice",
            how="left",
        )
        vol = np.load(layout.volume_path(paths.prep_dir(cfg), uid), mmap_mode="r")
        plot_localisation(vol, study, paths.viz_dir(cfg) / f"{uid}.png", title=f"{uid} (OOF)")


def stage2_wide(
    stage2: pd.DataFrame, uids: list[str], priors: dict[str, float], overall: str
) -> pd.DataFrame:
    """Stage-2 vertebra probabilities per study (prior where missing) + patient_overall by noisy-OR or max."""
    table = study_logit_table(stage2, priors, uids)
    probs = 1 / (1 + np.exp(-table[[f"logit_{v}" for v in VERTEBRAE]].to_numpy(np.float64)))
    wide = pd.DataFrame(probs, columns=VERTEBRAE)
    wide.insert(
        0, "patient_overall", noisy_or(probs) if overall == "noisy_or" else probs.max(axis=1)
    )
    wide.insert(0, "StudyInstanceUID", table["StudyInstanceUID"].to_numpy())
    return wide


def head_predictions(cfg: Config, stage2_path) -> pd.DataFrame | None:
    """The patient head's OOF predictions when they are newer than the stage-2 ones, else None."""
    head = cfg.stages.head
    if not head:
        return None
    path = paths.preds_csv(cfg, head)
    if path.is_file() and path.stat().st_mtime > stage2_path.stat().st_mtime:
        return read_predictions(path, UID)
    log.warning(
        "patient head '%s' has no OOF predictions newer than stage 2's: the CV report scores "
        "stage 2 + noisy-OR (train the head and run its OOF pass for the full pipeline)",
        head,
    )
    return None


def cv_report(cfg: Config) -> dict:
    """Score the OOF pipeline and the baselines on the same studies; write report, plot and OOF table."""
    stage2_path = paths.preds_csv(cfg, cfg.stages.fracture)
    stage2 = read_predictions(stage2_path, UID)
    folds = read_folds(cfg)
    labels = pd.read_csv(layout.labels_csv(paths.data_dir(cfg)), dtype={UID: str})
    truth = labels[labels.StudyInstanceUID.isin(folds.StudyInstanceUID)].reset_index(drop=True)
    uids = truth.StudyInstanceUID.tolist()
    priors = train_priors(cfg)
    write_text(json.dumps(priors, indent=2), layout.priors_json(cfg))
    preds = {
        "noisy_or": stage2_wide(stage2, uids, priors, "noisy_or"),
        "max": stage2_wide(stage2, uids, priors, "max"),
    }
    preds["prior"] = pd.DataFrame({"StudyInstanceUID": uids, **{t: priors[t] for t in TARGETS}})
    model = "stage 2 + noisy-OR"
    head = head_predictions(cfg, stage2_path)
    if head is not None:
        preds["head"] = head[[UID, *TARGETS]]
        model = "stage 2 + patient head"
    raw = preds.get("head", preds["noisy_or"])
    raw = raw.set_index("StudyInstanceUID").loc[uids].reset_index()
    calibrated = calibrate_oof(cfg, raw, truth, folds)
    loc = pd.read_csv(layout.stage2_labels_csv(cfg, "oof"), dtype={UID: str})
    post = cfg.post
    ref = reference(loc)
    save_json(ref, layout.plausibility_json(cfg))
    flags = implausible(loc, uids, float(post.min_peak), tuple(post.length_range), ref)
    final = shrink(calibrated, flags, priors, float(post.shrink))
    report = {
        "model": model,
        "oof_metric": score(final, truth),
        "oof_metric_global": score(final, truth, per_study=False),
        "oof_metric_raw": score(raw, truth),
        "oof_metric_calibrated": score(calibrated, truth),
        "calibration": post.calibration,
        "n_studies_implausible": int(flags[UID].nunique()),
        "baseline_prior": score(preds["prior"], truth),
        "baseline_noisy_or": score(preds["noisy_or"], truth),
        "baseline_max": score(preds["max"], truth),
        "per_target_logloss": per_target_logloss(final, truth),
        "per_target_auc": per_target_auc(final, truth),
        "n_studies": len(uids),
        "n_vertebrae_missing": int(7 * len(uids) - stage2.StudyInstanceUID.isin(uids).sum()),
    }
    report["ratio_to_prior"] = report["oof_metric"] / report["baseline_prior"]
    write_csv(final, paths.oof_csv(cfg))
    write_text(json.dumps(report, indent=2), paths.cv_report(cfg, "json"))
    write_text(report_markdown(report), paths.cv_report(cfg, "md"))
    y = truth[TARGETS].to_numpy().ravel()
    p = final[TARGETS].to_numpy().ravel()
    plot_calibration(
        y, p, paths.calibration_png(cfg), title=f"OOF calibration ({model}, all targets)"
    )
    return report


def calibrate_oof(
    cfg: Config, raw: pd.DataFrame, truth: pd.DataFrame, folds: pd.DataFrame
) -> pd.DataFrame:
    """Cross-fitted calibrated OOF predictions; saves the fit on every study for test time."""
    method = cfg.post.calibration
    if method not in ("platt", "none"):
        raise ConfigError(f"post.calibration must be platt or none, got {method!r}")
    if method == "none":
        layout.calibration_json(cfg).unlink(missing_ok=True)  # a stale fit must not be applied
        return raw
    fold = folds.set_index(UID).loc[raw[UID], "fold"].to_numpy()
    save_json(fit_platt(raw, truth), layout.calibration_json(cfg))
    return crossfit_platt(raw, truth, fold)


def report_markdown(r: dict) -> str:
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"  # noqa: E731
    lines = [
        "# Cross-validation report (out of fold)",
        "",
        f"Pipeline: **{r['model']}** on {r['n_studies']} studies ({r['n_vertebrae_missing']} vertebrae without stage-1 slices got the prior).",
        "",
        "| predictor | competition metric (per study) |",
        "|---|---|",
        f"| **{r['model']}**{' + calibration' if r['calibration'] != 'none' else ''} + plausibility shrink | **{fmt(r['oof_metric'])}** (global {fmt(r['oof_metric_global'])}) |",
        f"| {r['model']}, raw | {fmt(r['oof_metric_raw'])} |",
        f"| {r['model']}, calibrated ({r['calibration']}, cross-fitted) | {fmt(r['oof_metric_calibrated'])} |",
        f"| stage 2 + noisy-OR | {fmt(r['baseline_noisy_or'])} |",
        f"| stage 2 + max | {fmt(r['baseline_max'])} |",
        f"| constant train prior | {fmt(r['baseline_prior'])} |",
        "",
        f"Ratio to the constant-prior baseline: {fmt(r['ratio_to_prior'])}. "
        f"Studies whose localisation looked implausible (shrunk toward the prior): {r['n_studies_implausible']}.",
        "",
        "| target | log loss | AUC |",
        "|---|---|---|",
    ]
    lines += [
        f"| {t} | {fmt(r['per_target_logloss'][t])} | {fmt(r['per_target_auc'][t])} |"
        for t in TARGETS
    ]
    if "cross_style" in r:  # added by utils/rsna/cross_style.py
        c = r["cross_style"]
        lines += [
            "",
            f"## Cross-style check: {c['n_studies']} studies in a style training never saw",
            "",
            f"Data: `{c['data']}` (the whole test chain, scored against its answers).",
            "",
            "| predictor | competition metric (per study) |",
            "|---|---|",
            f"| **this pipeline** | **{fmt(c['metric'])}** |",
            f"| constant train prior | {fmt(c['baseline_prior'])} |",
            f"| 0.5 everywhere | {fmt(c['baseline_half'])} |",
            "",
            "AUC per target: "
            + ", ".join(f"{t} {fmt(c['per_target_auc'][t])}" for t in TARGETS)
            + ".",
        ]
    return "\n".join(lines) + "\n"


# ---- test ---------------------------------------------------------------------------------------
def read_test_rows(data: Path) -> pd.DataFrame:
    """test.csv rows (row_id, StudyInstanceUID, prediction_type), read by column name, in file order."""
    test = pd.read_csv(layout.test_csv(data), dtype={UID: str})
    need = {"row_id", "StudyInstanceUID", "prediction_type"}
    if not need <= set(test.columns):
        raise SystemExit(
            f"error: {layout.test_csv(data)} lacks columns {sorted(need - set(test.columns))}"
        )
    return test[["row_id", "StudyInstanceUID", "prediction_type"]]


def studies_to_predict(rows: pd.DataFrame, data: Path) -> list[str]:
    """The studies to predict: those of ``rows`` that have a folder in test_images, in row order.

    The public test.csv is a placeholder naming studies that are not in test_images: then every
    study actually present is predicted (its predictions land in the per-stage test files; the
    submission still has exactly the test.csv rows, which then take the train priors).
    """
    root = layout.images_dir(data, "test")
    available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    listed = [u for u in rows.StudyInstanceUID.unique() if u in set(available)]
    if available and not listed:
        log.warning(
            "test.csv names none of the %d studies in %s (public placeholder): predicting those; "
            "the submission keeps the %d test.csv rows",
            len(available),
            root,
            len(rows),
        )
        return available
    absent = sorted(set(rows.StudyInstanceUID) - set(available))
    if absent:
        log.warning(
            "%d test studies have no images in %s: they get the train priors", len(absent), root
        )
    return listed


def ensure_cached(s1: Config, uids: list[str], prep: Path) -> list[str]:
    """Cache the test studies not yet in ``prep`` (same settings as the training cache).

    Returns the studies that are cached; an unreadable one (e.g. an empty folder) is logged by
    name and left out, so its rows take the train priors and the submission is still written.
    """
    data = paths.data_dir(s1)
    check_cache_settings(prep, int(s1.cache.size), tuple(s1.cache.window))
    cached = []
    for uid in uids:
        if not layout.volume_path(prep, uid).is_file():
            try:
                process_study(
                    layout.study_dir(data, "test", uid),
                    "test",
                    prep,
                    int(s1.cache.size),
                    tuple(s1.cache.window),
                )
            except StudyReadError as err:
                log.warning("test study %s cannot be read (%s): it gets the train priors", uid, err)
                continue
        cached.append(uid)
    return cached


def predict_stage1(
    s1: Config, uid: str, prep: Path, models: list[torch.nn.Module], stride: int
) -> pd.DataFrame:
    """Per-slice box and C1..C7 ratios (mean of ``models``) of the cached study ``uid``.

    Stage 1 runs on every ``stride``-th slice (and the last); the other slices get ratios
    interpolated along z and no box (:func:`utils.rsna.localize.fill_skipped_slices`).
    """
    n = np.load(layout.volume_path(prep, uid), mmap_mode="r").shape[0]
    table = pd.DataFrame({UID: uid, "slice": strided_slices(n, stride)})
    pred = predict_frame(s1, models, table, prep=prep)
    return pred if stride == 1 else fill_skipped_slices(pred, n)


def submit(cfg: Config, out: Path | None) -> Path:
    """The pipeline's ``test`` hook: :func:`test_chain` into ``out`` (default: the test folder's)."""
    out = Path(out) if out is not None else paths.submission_csv(cfg)
    test_chain(cfg, out)
    return out


def test_chain(cfg: Config, out: Path) -> pd.DataFrame:
    """The whole test-time chain on ``cfg.data_dir`` -> ``out`` (intermediates in its test folder).

    Study by study: cache, stage 1 (``submit.stage1_stride``), localisation, stage 2; then the
    patient head on all of them. A :class:`~utils.budget.TimeGuard` over ``submit.budget_s``
    drops fold models when the studies left would not fit, and stops when the next one would
    not; every study not predicted (unreadable, failed, out of time) is named in the log and
    takes the train priors, so the submission is always written. With ``submit.keep_cache:
    false`` each study's cached volume is deleted once it is predicted. The calling config's
    ``submit.*`` keys apply; each stage otherwise runs as it was trained, without loader workers
    (one cached study is a handful of batches).
    """
    start = time.monotonic()
    stages, plan = cfg.stages, cfg.submit
    s1 = run_config(cfg, stages.vertebra).replace(num_workers=0)
    s2 = run_config(cfg, stages.fracture).replace(num_workers=0)
    data = paths.data_dir(cfg)
    rows = read_test_rows(data)
    uids = studies_to_predict(rows, data)
    prep = layout.test_prep_dir(cfg)
    m1, m2 = list(load_models(s1).values()), list(load_models(s2).values())
    guard = TimeGuard(plan.budget_s, min(len(m1), len(m2)), plan.warmup_studies, start=start)
    p1s, locs, p2s, done, failed = [], [], [], [], []
    for i, uid in enumerate(uids):
        models = guard.models_for(len(uids) - i)
        if models == 0:
            log.warning(
                "time budget (%s s) spent after %d of %d studies: these %d get the train priors: %s",
                plan.budget_s,
                i,
                len(uids),
                len(uids) - i,
                " ".join(uids[i:]),
            )
            break
        try:
            t0 = guard.clock()
            if not ensure_cached(s1, [uid], prep):
                continue
            t1 = guard.clock()
            p1 = predict_stage1(s1, uid, prep, m1[:models], plan.stage1_stride)
            t2 = guard.clock()
            loc = localize(p1, **s2.localize)
            t3 = guard.clock()
            p2 = predict_frame(s2, m2[:models], loc, prep=prep)
            t4 = guard.clock()
        except Exception as err:  # one bad study must not cost the whole submission
            log.warning(
                "test study %s failed (%r): it gets the train priors", uid, err, exc_info=True
            )
            failed.append(uid)
            continue
        guard.record((t1 - t0) + (t3 - t2), (t2 - t1) + (t4 - t3), models)
        if not plan.keep_cache:
            layout.volume_path(prep, uid).unlink()
        p1s.append(p1)
        locs.append(loc)
        p2s.append(p2)
        done.append(uid)
    if failed and not done:
        raise SystemExit(f"error: every test study failed ({len(failed)}; see the log above)")
    p1 = pd.concat(p1s, ignore_index=True) if p1s else pd.DataFrame(columns=[UID, "slice"])
    write_csv(p1, paths.test_preds_csv(cfg, s1.exp_name))
    loc = pd.concat(locs, ignore_index=True) if locs else pd.DataFrame(columns=LOC_COLUMNS)
    write_csv(loc, layout.stage2_labels_csv(cfg, "test"))
    p2 = pd.concat([p for p in p2s if len(p)] or [pd.DataFrame(columns=[UID, "vertebra"])])
    if "logit" not in p2:  # no study with a located vertebra: every row takes the prior below
        p2 = p2.assign(logit=pd.Series(dtype=np.float32))
    write_csv(p2, paths.test_preds_csv(cfg, s2.exp_name))
    priors = train_priors(cfg)
    if not done:  # nothing predicted: every row takes its prior in write_submission
        wide = pd.DataFrame(columns=[UID, *TARGETS])
    elif stages.head:
        head = run_config(cfg, stages.head)
        table = study_logit_table(p2, priors, done)
        wide = predict_frame(head, load_models(head).values(), table)
    else:
        log.warning("no patient head (stages.head=null): patient_overall by noisy-OR")
        wide = stage2_wide(p2, done, priors, "noisy_or")
    platt = cfg.post.calibration == "platt"
    calibration = load_json(layout.calibration_json(cfg), "calibration fit") if platt else None
    ref = load_json(layout.plausibility_json(cfg), "plausibility reference")
    wide, _ = finalise(wide, loc, priors, cfg.post, calibration, ref)
    return write_submission(rows, wide, priors, out)


def write_submission(
    rows: pd.DataFrame, wide: pd.DataFrame, priors: dict[str, float], out: Path
) -> pd.DataFrame:
    """Look up each row's probability; anything missing takes its target's train prior; clip; validate; write."""
    long = wide.melt(
        "StudyInstanceUID", TARGETS, var_name="prediction_type", value_name="fractured"
    )
    repeated = rows.row_id.duplicated()
    if repeated.any():
        log.warning(
            "test.csv repeats %d row_id(s) (%s): one row each",
            int(repeated.sum()),
            ", ".join(rows.row_id[repeated].unique()[:3]),
        )
        rows = rows[~repeated]
    sub = rows.merge(long, on=["StudyInstanceUID", "prediction_type"], how="left", validate="m:1")
    unknown = sorted(set(sub.prediction_type) - set(TARGETS))
    if unknown:
        raise SystemExit(f"error: test.csv has unknown prediction_type values {unknown}")
    n_fill = int(sub.fractured.isna().sum())
    filled = sub.fractured.astype(np.float64).fillna(sub.prediction_type.map(priors))
    sub["fractured"] = filled.clip(CLIP, 1 - CLIP)
    if n_fill:
        log.warning("%d of %d rows had no prediction and got the train prior", n_fill, len(sub))
    sub = sub[["row_id", "fractured"]]
    validate_submission(sub, rows[["row_id"]].assign(fractured=0.0))
    write_csv(sub, out)
    log.info(
        "submission: %d rows for %d studies -> %s", len(sub), rows.StudyInstanceUID.nunique(), out
    )
    return sub
