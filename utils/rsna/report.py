"""RSNA 2022 reports: what happens after a stage's OOF predictions (the pipeline's ``after_oof``).

- after the stage-1 OOF pass: localisation plots of a few segmented studies (``viz/``);
- after the stage-2 or patient-head OOF pass: the CV report, which scores the whole pipeline
  (stage 2 + the patient head when its OOF predictions are current, else noisy-OR) against the
  constant-prior, noisy-OR and max baselines on the same studies, and saves what the test-time
  chain applies (train priors, calibration fit, plausibility reference). When stage 2 is an
  ensemble of experiments (utils/ensemble.py) it also shows each member, the plain mean and the
  ensemble side by side.

``python -m utils.rsna.report --CFG config/rsna/patient_head.yaml [key=value ...]`` prints the
summary of the last CV report (``cv_report.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from utils import cli, ensemble, paths
from utils.config import Config
from utils.errors import InputError
from utils.experiments import CvResult
from utils.folds import load_folds
from utils.io import write_csv, write_text
from utils.plots import plot_calibration, plt, save_figure
from utils.predict import read_predictions
from utils.rsna import layout
from utils.rsna.datasets import VERTEBRAE, study_logit_table, train_priors
from utils.rsna.metric import (
    TARGETS,
    UID,
    noisy_or,
    per_target_auc,
    per_target_logloss,
    score,
)
from utils.rsna.postprocess import (
    crossfit_platt,
    fit_platt,
    implausible,
    match_prior,
    reference,
    save_json,
    shrink,
)

log = logging.getLogger(__name__)
# Checks of the trained chain on data unlike its training set (utils/rsna/cross_style.py): the
# key under which each lands in the CV report, and what its studies are.
# How patient_overall is made from the seven stage-2 vertebra logits (post.patient).
PATIENT_LEVELS = {"head": "patient head", "noisy_or": "noisy-OR"}
SHIFTED_CHECKS = {
    "cross_style": "a generator style the demo never trained on",
    "phantom": "an independent phantom generator (other anatomy, fields of view, fractures)",
}


def read_folds(cfg: Config) -> pd.DataFrame:
    return load_folds(paths.folds_csv(cfg), UID)


# ---- after the OOF passes -----------------------------------------------------------------------
def after_oof(run: Config) -> CvResult | None:
    """The report for the stage whose OOF predictions were just written (see module docstring)."""
    stages = run.stages
    if run.exp_name == stages.vertebra:
        draw_localisation(run, read_predictions(paths.preds_csv(run), UID))
        return None
    if run.exp_name in (stages.fracture, stages.head):
        r = cv_report(run)
        summary = (
            f"OOF metric ({r['model']}): {r['oof_metric']:.4f} | constant-prior baseline: "
            f"{r['baseline_prior']:.4f} | ratio {r['ratio_to_prior']:.2f} | noisy-OR "
            f"{r['baseline_noisy_or']:.4f} | report: {paths.cv_report(run, 'md')}"
        )
        return CvResult(summary, "oof_metric", r["oof_metric"], "min")
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
        plot_localisation(vol, study, layout.viz_dir(cfg) / f"{uid}.png", title=f"{uid} (OOF)")


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
    head = head_predictions(cfg, stage2_path)
    if head is not None:
        preds["head"] = head[[UID, *TARGETS]]
    loc = pd.read_csv(layout.stage2_labels_csv(cfg, "oof"), dtype={UID: str})
    post = cfg.post
    ref = reference(loc)
    save_json(ref, layout.plausibility_json(cfg))
    flags = implausible(loc, uids, float(post.min_peak), tuple(post.length_range), ref)
    fold = folds.set_index(UID).loc[uids, "fold"].to_numpy()
    candidates = {  # patient level -> (raw, calibrated, final) OOF predictions
        level: post_process_oof(cfg, preds[level], uids, truth, fold, flags, priors)
        for level in PATIENT_LEVELS
        if level in preds
    }
    scores = {level: score(final, truth) for level, (_, _, final) in candidates.items()}
    level = choose_patient_level(post.patient, scores)
    save_json({"patient_level": level, "oof_metric": scores}, layout.patient_level_json(cfg))
    raw, calibrated, final = candidates[level]
    save_calibration(cfg, raw, truth)
    model = f"stage 2 + {PATIENT_LEVELS[level]}"
    report = {
        "model": model,
        "patient_level": {"chosen": level, "by": post.patient, "oof_metric": scores},
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
    if ensemble.read_record(cfg, cfg.stages.fracture) is not None:
        report["ensemble"] = ensemble_table(cfg, uids, truth, priors)
    write_csv(final, layout.oof_csv(cfg))
    write_text(json.dumps(report, indent=2), paths.cv_report(cfg, "json"))
    write_text(report_markdown(report), paths.cv_report(cfg, "md"))
    y = truth[TARGETS].to_numpy().ravel()
    p = final[TARGETS].to_numpy().ravel()
    plot_calibration(
        y, p, layout.calibration_png(cfg), title=f"OOF calibration ({model}, all targets)"
    )
    return report


def post_process_oof(
    cfg: Config,
    wide: pd.DataFrame,
    uids: list[str],
    truth: pd.DataFrame,
    fold: np.ndarray,
    flags: pd.DataFrame,
    priors: dict[str, float],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(raw, calibrated, final) OOF predictions of one patient level, rows in ``uids`` order.

    Calibration is cross-fitted (fold k by the other folds' fit), the prior matching (no labels)
    runs over every OOF study, then the flagged studies are shrunk toward the prior: what the
    test chain does, without fitting on the rows it scores.
    """
    raw = wide.set_index(UID).loc[uids].reset_index()
    method = cfg.post.calibration
    calibrated = raw if method == "none" else crossfit_platt(raw, truth, fold, method)
    matched = match_prior(calibrated, priors) if cfg.post.match_prior else calibrated
    return raw, calibrated, shrink(matched, flags, priors, float(cfg.post.shrink))


def choose_patient_level(setting: str, scores: dict[str, float]) -> str:
    """``post.patient``: the named level, or with ``auto`` the one of lower OOF metric.

    A named level without OOF predictions yet (the stage-2 pass reports before the head is
    trained) falls back to the best one there is, with a warning; the head's own OOF pass
    reports again.
    """
    if setting in scores:
        return setting
    if setting != "auto":
        log.warning(
            "post.patient=%s: no OOF predictions of it yet (have %s): this report scores the "
            "best of those; train the patient head and run its OOF pass",
            setting,
            sorted(scores),
        )
    return min(scores, key=scores.get)


def ensemble_table(
    cfg: Config, uids: list[str], truth: pd.DataFrame, priors: dict[str, float]
) -> dict:
    """Stage 2 as an ensemble of experiments: each member, the plain mean and the ensemble with
    the weights it uses, on stage 2's own validation metric and as stage 2 + noisy-OR."""
    exp = cfg.stages.fracture
    metric, lines = ensemble.predictors(cfg, exp)
    fit = ensemble.read_record(cfg, exp)["fit"]
    rows = [
        {**p.row(), "noisy_or": score(stage2_wide(p.frame, uids, priors, "noisy_or"), truth)}
        for p in lines
    ]
    return {"exp": exp, "metric": metric, "fit": fit["method"] if fit else None, "rows": rows}


def save_calibration(cfg: Config, raw: pd.DataFrame, truth: pd.DataFrame) -> None:
    """The calibration fit on every OOF study, which the test chain applies (none: removed, so
    a stale fit cannot be applied)."""
    method = cfg.post.calibration
    if method == "none":
        layout.calibration_json(cfg).unlink(missing_ok=True)
        return
    save_json(fit_platt(raw, truth, method), layout.calibration_json(cfg))


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
    if "ensemble" in r:
        extra = {"noisy_or": "stage 2 + noisy-OR"}
        lines += ensemble.report_section(r["ensemble"], "Stage 2: the ensemble `{exp}`", extra)
    for name, what in SHIFTED_CHECKS.items():  # added by utils/rsna/cross_style.py
        if name not in r:
            continue
        c = r[name]
        lines += [
            "",
            f"## Shifted data: {c['n_studies']} studies from {what}",
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


def plot_localisation(vol: np.ndarray, preds: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Stage-1 view of one study: sagittal mid-plane, ratio curves along z, and an axial slice with boxes.

    ``vol``: (Z, S, S) uint8; ``preds``: per slice ``slice, x0, y0, x1, y1, C1..C7`` (predicted),
    with optional ``true_C1..true_C7`` columns drawn dashed.
    """
    z, s, _ = vol.shape
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.3, 1]})
    axes[0].imshow(vol[:, :, s // 2], cmap="gray", aspect="auto")
    axes[0].set_title("sagittal (mid column)"), axes[0].set_ylabel("slice (head -> feet)")
    colors = plt.cm.tab10(np.arange(7))
    for i in range(7):
        axes[1].plot(preds["slice"], preds[f"C{i + 1}"], color=colors[i], label=f"C{i + 1}")
        if f"true_C{i + 1}" in preds:
            axes[1].plot(preds["slice"], preds[f"true_C{i + 1}"], color=colors[i], ls="--", lw=1)
    (
        axes[1].set_xlabel("slice"),
        axes[1].set_title("predicted ratios (dashed: truth)"),
        axes[1].legend(fontsize=7, ncol=2),
    )
    k = int(preds.loc[preds[[f"C{i}" for i in range(1, 8)]].sum(axis=1).idxmax(), "slice"])
    axes[2].imshow(vol[k], cmap="gray")
    x0, y0, x1, y1 = preds.loc[preds["slice"] == k, ["x0", "y0", "x1", "y1"]].to_numpy()[0] * s
    axes[2].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
    axes[2].set_title(f"axial slice {k} with predicted box")
    fig.suptitle(title)
    return save_figure(fig, path)


def summary(cfg: Config) -> str:
    """The CV report's headline as printed at the end of ``sh train.sh``: metric, baselines, AUCs."""
    path = paths.cv_report(cfg, "json")
    if not path.is_file():
        raise InputError(f"{path} not found; run inference.py --split oof on the last stage first")
    r = json.loads(path.read_text())
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        f"OOF competition metric ({r['model']}): {r['oof_metric']:.4f}  |  constant-prior "
        f"baseline: {r['baseline_prior']:.4f}  |  ratio {r['ratio_to_prior']:.2f}  |  "
        f"noisy-OR {r['baseline_noisy_or']:.4f}",
        "OOF AUC: " + "  ".join(f"{t} {fmt(v)}" for t, v in r["per_target_auc"].items()),
    ]
    if "ensemble" in r:
        e = r["ensemble"]
        lines.append(
            f"stage-2 ensemble, OOF {e['metric']} (stage 2 + noisy-OR): "
            + "  |  ".join(f"{x['name']} {x['score']:.4f} ({x['noisy_or']:.4f})" for x in e["rows"])
        )
    for name, label in (("cross_style", "unseen style"), ("phantom", "independent phantom")):
        if name in r:
            c = r[name]
            lines.append(
                f"{label} ({c['n_studies']} studies): {c['metric']:.4f}  |  constant prior "
                f"{c['baseline_prior']:.4f}  |  0.5 everywhere {c['baseline_half']:.4f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cli.config_command(__doc__, summary, "config/rsna/patient_head.yaml", argv)


if __name__ == "__main__":
    main()
