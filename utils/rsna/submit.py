"""The RSNA 2022 test-time chain (the pipeline's ``test`` hook): ``data_dir`` -> submission.csv.

Cache the test studies (in the run's own test folder, never the training cache), stage-1 fold
ensemble, localisation, stage-2 fold ensemble, patient head, then the same post-processing as the
CV report -> submission rows in test.csv order, columns row_id,fractured.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from utils import ensemble, paths
from utils.budget import TimeGuard
from utils.config import Config
from utils.errors import InputError
from utils.io import write_csv
from utils.predict import load_models, predict_frame, run_config
from utils.registry import DATASETS
from utils.rsna import layout
from utils.rsna.datasets import study_logit_table, train_priors
from utils.rsna.dicom import StudyReadError
from utils.rsna.localize import COLUMNS as LOC_COLUMNS
from utils.rsna.localize import fill_skipped_slices, localize, strided_slices
from utils.rsna.metric import TARGETS, UID, validate_submission
from utils.rsna.postprocess import finalise
from utils.rsna.preprocess import check_cache_settings, is_cached, process_study
from utils.rsna.report import stage2_wide

log = logging.getLogger(__name__)
CLIP = 1e-6  # submission probabilities are kept inside [CLIP, 1 - CLIP]


def read_test_rows(data: Path) -> pd.DataFrame:
    """test.csv rows (row_id, StudyInstanceUID, prediction_type), read by column name, in file order."""
    test = pd.read_csv(layout.test_csv(data), dtype={UID: str})
    need = {"row_id", "StudyInstanceUID", "prediction_type"}
    if not need <= set(test.columns):
        raise InputError(
            f"{layout.test_csv(data)} lacks columns {sorted(need - set(test.columns))}"
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
        if not is_cached(prep, uid, int(s1.cache.size)):
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


def chain_products(cfg: Config) -> dict[str, Path]:
    """The CV report's products the test-time chain reads besides the fold runs, by role.

    The Kaggle bundle ships exactly these (utils/rsna/kaggle_bundle.py), so the notebook runs the
    chain inference.py runs. ``priors`` is read where the data folder has no train.csv;
    ``patient level`` with ``post.patient: auto`` (the head or noisy-OR, as the report chose);
    ``calibration`` unless ``post.calibration: none``; ``plausibility`` with ``post.shrink`` > 0.
    """
    products = {"priors": layout.priors_json(cfg)}
    if cfg.post.patient == "auto":
        products["patient level"] = layout.patient_level_json(cfg)
    if cfg.post.calibration != "none":
        products["calibration"] = layout.calibration_json(cfg)
    if float(cfg.post.shrink) > 0:
        products["plausibility"] = layout.plausibility_json(cfg)
    return products


def read_products(cfg: Config) -> dict[str, Any]:
    """The patient level, calibration fit and plausibility reference the chain applies.

    A missing one stops the chain with one line (a chain without it would submit other numbers
    than the CV report scored); the priors are read by ``train_priors``.
    """
    wanted = {k: p for k, p in chain_products(cfg).items() if k != "priors"}
    missing = [f"{k} ({p})" for k, p in wanted.items() if not p.is_file()]
    if missing:
        raise InputError(
            f"the test-time chain is configured to apply {', '.join(missing)}, which the CV report "
            "writes: run inference.py --split oof on the last stage first"
        )
    return {k: json.loads(p.read_text()) for k, p in wanted.items()}


def patient_level(cfg: Config, products: dict[str, Any]) -> str:
    """``head`` or ``noisy_or``: ``post.patient``, or with ``auto`` what the CV report chose."""
    if cfg.post.patient == "auto":
        return products["patient level"]["patient_level"]
    return cfg.post.patient


def submit(cfg: Config, out: Path | None) -> Path:
    """The pipeline's ``test`` hook: :func:`test_chain` into ``out`` (default: the test folder's)."""
    out = Path(out) if out is not None else layout.submission_csv(cfg)
    test_chain(cfg, out)
    return out


def test_chain(cfg: Config, out: Path) -> pd.DataFrame:
    """The whole test-time chain on ``cfg.data_dir`` -> ``out`` (intermediates in its test folder).

    Study by study: cache, stage 1 (``submit.stage1_stride``), localisation, stage 2; then the
    patient head on all of them. Stage 2 may be an ensemble of experiments (utils/ensemble.py):
    each member predicts the study's vertebrae with its own fold models on its own crops (image
    size, sequence length), and their logits are combined with the ensemble's recorded weights;
    each member's predictions are also written beside the ensemble's. A
    :class:`~utils.budget.TimeGuard` over ``submit.budget_s`` drops ensemble members (lowest
    weight first), then fold models, when the studies left would not fit, and stops when the
    next one would not; every study not predicted (unreadable, failed, out of time) is named in
    the log and takes the train priors, so the submission is always written. With
    ``submit.keep_cache: false`` each study's cached volume is deleted once it is predicted. The
    calling config's ``submit.*`` keys apply; each stage otherwise runs as it was trained,
    without loader workers (one cached study is a handful of batches).
    """
    start = time.monotonic()
    products = read_products(cfg)  # before any work: a missing one is an error, not a silent skip
    stages, plan = cfg.stages, cfg.submit
    s1 = run_config(cfg, stages.vertebra).replace(num_workers=0)
    s2 = [(run.replace(num_workers=0), w) for run, w in ensemble.test_members(cfg, stages.fracture)]
    if any(run.localize != s2[0][0].localize for run, _ in s2):
        raise InputError(f"the members of '{stages.fracture}' were trained with other localize.*")
    data = paths.data_dir(cfg)
    rows = read_test_rows(data)
    uids = studies_to_predict(rows, data)
    prep = layout.test_prep_dir(cfg)
    m1 = list(load_models(s1).values())
    m2 = [list(load_models(run).values()) for run, _ in s2]
    guard = TimeGuard(
        plan.budget_s,
        min(len(m1), *map(len, m2)),
        plan.warmup_studies,
        [w for _, w in s2],
        start=start,
    )
    dataset = DATASETS.get(s2[0][0].dataset.name)
    p1s, locs, p2s, members, done, failed = [], [], [], [[] for _ in s2], [], []
    for i, uid in enumerate(uids):
        use = guard.plan_for(len(uids) - i)
        if use is None:
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
            p1 = predict_stage1(s1, uid, prep, m1[: use.folds], plan.stage1_stride)
            t2 = guard.clock()
            loc = localize(p1, **s2[0][0].localize)
            t3 = guard.clock()
            parts, member_s = {}, {}
            for j in use.members:
                tj = guard.clock()
                parts[j] = predict_frame(s2[j][0], m2[j][: use.folds], loc, prep=prep)
                member_s[j] = guard.clock() - tj
            p2 = ensemble.combine(dataset, list(parts.values()), [s2[j][1] for j in parts])
        except Exception as err:  # one bad study must not cost the whole submission
            log.warning(
                "test study %s failed (%r): it gets the train priors", uid, err, exc_info=True
            )
            failed.append(uid)
            continue
        guard.record((t1 - t0) + (t3 - t2), t2 - t1, member_s, use)
        if not plan.keep_cache:  # the study's metadata row goes too: it is no longer cached
            layout.volume_path(prep, uid).unlink()
            layout.study_row_json(prep, uid).unlink()
        p1s.append(p1)
        locs.append(loc)
        p2s.append(p2)
        for j, part in parts.items():
            members[j].append(part)
        done.append(uid)
    if failed and not done:
        raise InputError(f"every test study failed ({len(failed)}; see the log above)")
    p1 = pd.concat(p1s, ignore_index=True) if p1s else pd.DataFrame(columns=[UID, "slice"])
    write_csv(p1, paths.test_preds_csv(cfg, s1.exp_name))
    loc = pd.concat(locs, ignore_index=True) if locs else pd.DataFrame(columns=LOC_COLUMNS)
    write_csv(loc, layout.stage2_labels_csv(cfg, "test"))
    if len(s2) > 1:  # an ensemble: each member's own predictions beside the combined ones
        for (run, _), parts in zip(s2, members, strict=True):
            write_csv(stage2_frame(parts), paths.test_preds_csv(cfg, run.exp_name))
    p2 = stage2_frame(p2s)
    write_csv(p2, paths.test_preds_csv(cfg, stages.fracture))
    priors = train_priors(cfg)
    if not done:  # nothing predicted: every row takes its prior in write_submission
        wide = pd.DataFrame(columns=[UID, *TARGETS])
    elif patient_level(cfg, products) == "head":
        head = run_config(cfg, stages.head)
        table = study_logit_table(p2, priors, done)
        wide = predict_frame(head, load_models(head).values(), table)
    else:  # the CV report found noisy-OR better (or there is no head): patient_level.json
        wide = stage2_wide(p2, done, priors, "noisy_or")
    wide, _ = finalise(
        wide, loc, priors, cfg.post, products.get("calibration"), products.get("plausibility")
    )
    return write_submission(rows, wide, priors, out)


def stage2_frame(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Stage-2 predictions of several studies in one table, with a ``logit`` column even when no
    study had a located vertebra (every row then takes the prior)."""
    p2 = pd.concat([p for p in parts if len(p)] or [pd.DataFrame(columns=[UID, "vertebra"])])
    return p2 if "logit" in p2 else p2.assign(logit=pd.Series(dtype=np.float32))


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
        raise InputError(f"test.csv has unknown prediction_type values {unknown}")
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
