"""Ensembles of experiments on the tiny RSNA runs (utils/ensemble.py): two stage-2 members that
differ in crop size and sequence length, their OOF routed per member, the ensemble's OOF and
nested fit recomputed by hand, the patient head, CV report, test chain and Kaggle notebook on it.

Works in a copy of the tiny trained runs, so the other tests' products stay as they are.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import nnls

import inference
import train
from tests.rsna.test_kaggle import kaggle_tree, read_submission, run_notebook
from utils import ensemble, paths
from utils.config import load_config
from utils.folds import load_folds
from utils.predict import load_models, predict_frame, run_config
from utils.rsna import kaggle_bundle, layout
from utils.rsna.kaggle import SLUG
from utils.rsna.metric import validate_submission

STAGE2 = "config/rsna/stage2_fracture.yaml"
ENSEMBLE = "config/rsna/stage2_ensemble.yaml"
HEAD = "config/rsna/patient_head.yaml"
UID = "StudyInstanceUID"
KEYS = [UID, "vertebra"]
MEMBERS = "ensemble=[{exp: stage2_fracture}, {exp: stage2_b, weight: 0.5}]"
CHAIN = ["stages.fracture=stage2_ensemble", "stages.head=head_ens"]


@pytest.fixture(scope="module")
def ens(tiny_head, tiny_ov, tmp_path_factory):
    """A copy of the tiny runs with a second stage-2 member (24 px crops, 6 slices) and the OOF
    pass of the ensemble of both (weights 1 and 0.5): (overrides, ensemble overrides)."""
    out = tmp_path_factory.mktemp("rsna_ensemble") / "output"
    shutil.copytree(tiny_head.output_dir, out, ignore=shutil.ignore_patterns("test"))
    ov = [o for o in tiny_ov if not o.startswith("output_dir=")] + [f"output_dir={out}"]
    member = ["exp_name=stage2_b", "dataset.params.seq_len=6", "dataset.params.image_size=24"]
    train.main(["--CFG", STAGE2, *ov, *member])
    inference.main(["--CFG", ENSEMBLE, "--split", "oof", *ov, MEMBERS])
    return ov, [*ov, MEMBERS]


def preds(ov: list[str], exp: str) -> pd.DataFrame:
    return pd.read_csv(paths.preds_csv(load_config(STAGE2, ov), exp), dtype={UID: str})


def merged(ens: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The ensemble's rows beside member a's (``*_a``) and member b's (``*_b``) on the same keys."""
    return ens.merge(a, on=KEYS, suffixes=("", "_a")).merge(
        b.add_suffix("_b").rename(columns={f"{k}_b": k for k in KEYS}), on=KEYS
    )


def labels(ov: list[str], rows: pd.DataFrame) -> np.ndarray:
    """Each row's vertebra label, read from train.csv here."""
    cfg = load_config(STAGE2, ov)
    train_csv = pd.read_csv(layout.labels_csv(paths.data_dir(cfg)), dtype={UID: str})
    long = train_csv.melt(UID, [f"C{i}" for i in range(1, 8)], var_name="vertebra")
    return rows[KEYS].merge(long, on=KEYS, how="left")["value"].to_numpy(np.float64)


def wlogloss(z: np.ndarray, y: np.ndarray) -> float:
    """The stage-2 metric written out: log loss of sigmoid(z), positives weighted 2:1."""
    p = np.clip(1 / (1 + np.exp(-z)), 1e-7, 1 - 1e-7)
    w = np.where(y > 0, 2.0, 1.0)
    return float((w * -(y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())


def read_test_csv(cfg) -> pd.DataFrame:
    return pd.read_csv(layout.test_csv(paths.data_dir(cfg)))


def test_each_member_predicts_its_rows_with_its_own_fold_model(ens):
    ov, _ = ens
    cfg = load_config(STAGE2, ov)
    folds = load_folds(paths.folds_csv(cfg), UID).set_index(UID)["fold"]
    table = pd.read_csv(layout.stage2_labels_csv(cfg, "oof"), dtype={UID: str})
    for exp, seq_len in (("stage2_fracture", 4), ("stage2_b", 6)):
        run = run_config(cfg, exp)
        assert run.dataset.params.seq_len == seq_len  # each member builds its own crops
        stored = preds(ov, exp)
        assert (stored["fold"] == stored[UID].map(folds)).all()
        models = load_models(run)
        for k in (0, 1):
            part = table[table[UID].map(folds) == k]
            own = predict_frame(run, [models[k]], part).merge(stored, on=KEYS)
            np.testing.assert_allclose(own["logit_x"], own["logit_y"], rtol=1e-5, atol=1e-6)
            other = predict_frame(run, [models[1 - k]], part).merge(stored, on=KEYS)
            assert np.abs(other["logit_x"] - other["logit_y"]).max() > 1e-4


def test_ensemble_oof_is_the_weighted_mean_of_the_member_logits(ens):
    ov, ens_ov = ens
    a, b = preds(ov, "stage2_fracture"), preds(ov, "stage2_b")
    mixed = merged(preds(ov, "stage2_ensemble"), a, b)
    assert len(mixed) == len(a) == len(b)
    assert (mixed["fold"] == mixed["fold_a"]).all() and (mixed["fold"] == mixed["fold_b"]).all()
    by_hand = (mixed["logit_a"] + 0.5 * mixed["logit_b"]) / 1.5
    np.testing.assert_allclose(mixed["logit"], by_hand, rtol=1e-9)
    record = ensemble.read_record(load_config(ENSEMBLE, ens_ov))
    assert record["fit"] is None and record["metric"] == "val_wlogloss"
    assert record["weights"] == pytest.approx({"stage2_fracture": 2 / 3, "stage2_b": 1 / 3})


def test_nested_fit_and_the_ensembles_metric_recomputed_by_hand(ens, capsys):
    ov, ens_ov = ens
    cfg = load_config(ENSEMBLE, ens_ov)
    ensemble.main(["fit", "--CFG", ENSEMBLE, *ens_ov])
    printed = capsys.readouterr().out
    fit = ensemble.read_record(cfg)["fit"]
    assert fit["method"] == "hill" and sorted(fit["fold_weights"]) == ["0", "1"]
    s = ensemble.load_oof(cfg, ["stage2_fracture", "stage2_b"])
    for k, weights in fit["fold_weights"].items():  # fitted on the other fold only
        alone = ensemble.fit_weights(s, s.folds != int(k), "hill", cfg.ensemble_fit.rounds)
        assert [weights[n] for n in s.names] == pytest.approx(alone.tolist())
    a, b = preds(ov, "stage2_fracture"), preds(ov, "stage2_b")
    mixed = merged(preds(ov, "stage2_ensemble"), a, b)
    w = mixed["fold"].astype(str).map(fit["fold_weights"])
    by_hand = [
        r["stage2_fracture"] * za + r["stage2_b"] * zb
        for r, za, zb in zip(w, mixed["logit_a"], mixed["logit_b"], strict=True)
    ]
    np.testing.assert_allclose(mixed["logit"], by_hand, rtol=1e-9)
    metric, lines = ensemble.predictors(cfg)
    scores = {p.name: p.score for p in lines}
    y = labels(ov, mixed)
    assert scores["stage2_ensemble"] == pytest.approx(wlogloss(mixed["logit"].to_numpy(), y))
    assert scores["stage2_b"] == pytest.approx(wlogloss(mixed["logit_b"].to_numpy(), y))
    mean = (mixed["logit_a"] + mixed["logit_b"]).to_numpy() / 2
    assert scores["mean"] == pytest.approx(wlogloss(mean, y))
    assert f"| stage2_ensemble | – | {scores['stage2_ensemble']:.4f} |" in printed
    log = pd.read_csv(paths.experiments_csv(cfg), dtype=str, keep_default_na=False)
    assert log.iloc[-1][["exp_name", "fold", "metric"]].tolist() == [
        "stage2_ensemble",
        "cv",
        "oof_wlogloss",
    ]
    assert float(log.iloc[-1]["cv_metric"]) == pytest.approx(scores["stage2_ensemble"])


def test_nnls_weights_are_scipys_on_the_member_logits(ens):
    ov, ens_ov = ens
    nnls_ov = [*ens_ov, "ensemble_fit.method=nnls"]
    ensemble.main(["fit", "--CFG", ENSEMBLE, *nnls_ov])
    cfg = load_config(ENSEMBLE, nnls_ov)
    a, b = preds(ov, "stage2_fracture"), preds(ov, "stage2_b").set_index(KEYS)
    logits = np.stack([a["logit"], b.loc[pd.MultiIndex.from_frame(a[KEYS]), "logit"]], axis=1)
    w, _ = nnls(logits, 2 * labels(ov, a) - 1)
    fitted = ensemble.read_record(cfg)["weights"]
    assert [fitted["stage2_fracture"], fitted["stage2_b"]] == pytest.approx(w / w.sum())
    ensemble.main(["fit", "--CFG", ENSEMBLE, *ens_ov])  # back to hill for the tests below


def test_a_stale_fit_and_bad_ensembles_are_one_line_errors(ens):
    ov, ens_ov = ens
    with pytest.raises(SystemExit, match=r"^error: 'stage2_ensemble' is an ensemble"):
        train.main(["--CFG", ENSEMBLE, *ens_ov])
    mixed = [*ov, "ensemble=[{exp: stage2_fracture}, {exp: stage1_vertebra}]", "exp_name=mix"]
    with pytest.raises(SystemExit, match=r"^error: ensemble members must share the dataset"):
        inference.main(["--CFG", ENSEMBLE, "--split", "oof", *mixed])
    itself = [*ov, "ensemble=[{exp: stage2_fracture}]", "exp_name=stage2_fracture"]
    with pytest.raises(SystemExit, match=r"^error: ensemble 'stage2_fracture' needs distinct"):
        inference.main(["--CFG", ENSEMBLE, "--split", "oof", *itself])
    member = paths.preds_csv(load_config(ENSEMBLE, ens_ov), "stage2_b")
    saved = member.stat()
    try:
        member.touch()  # the member's OOF predictions changed after the fit
        with pytest.raises(SystemExit, match=r"^error: the weights in .* were fitted before"):
            inference.main(["--CFG", ENSEMBLE, "--split", "oof", *ens_ov])
    finally:
        os.utime(member, ns=(saved.st_atime_ns, saved.st_mtime_ns))


@pytest.fixture(scope="module")
def head_on_ensemble(ens):
    """A patient head trained on the fitted ensemble's OOF predictions, with its CV report."""
    ov, ens_ov = ens
    chain = [*ov, *CHAIN, "exp_name=head_ens"]
    train.main(["--CFG", HEAD, *chain])
    inference.main(["--CFG", HEAD, "--split", "oof", *chain])
    return [*ov, *CHAIN]


def test_the_head_and_cv_report_see_the_ensemble(head_on_ensemble):
    cfg = load_config(HEAD, head_on_ensemble)
    head = run_config(cfg, "head_ens")
    assert head.stages.fracture == "stage2_ensemble"
    report = json.loads(paths.cv_report(cfg, "json").read_text())
    assert report["model"] == "stage 2 + patient head"
    rows = {r["name"]: r for r in report["ensemble"]["rows"]}
    assert list(rows) == ["stage2_fracture", "stage2_b", "mean", "stage2_ensemble"]
    assert report["ensemble"]["fit"] == "hill" and rows["mean"]["weight"] is None
    assert "## Stage 2: the ensemble `stage2_ensemble`" in paths.cv_report(cfg, "md").read_text()


def test_the_test_chain_combines_each_members_own_predictions(head_on_ensemble, tmp_path):
    cfg = load_config(HEAD, head_on_ensemble)
    out = tmp_path / "submission.csv"
    inference.main(["--CFG", HEAD, "--split", "test", "--out", str(out), *head_on_ensemble])
    sub = pd.read_csv(out)
    validate_submission(sub, read_test_csv(cfg)[["row_id"]].assign(fractured=0.0))
    weights = ensemble.read_record(cfg, "stage2_ensemble")["weights"]
    tests = {e: pd.read_csv(paths.test_preds_csv(cfg, e), dtype={UID: str}) for e in weights}
    combined = pd.read_csv(paths.test_preds_csv(cfg, "stage2_ensemble"), dtype={UID: str})
    mixed = merged(combined, tests["stage2_fracture"], tests["stage2_b"])
    assert len(mixed) == len(combined) > 0
    by_hand = weights["stage2_fracture"] * mixed["logit_a"] + weights["stage2_b"] * mixed["logit_b"]
    np.testing.assert_allclose(mixed["logit"], by_hand, rtol=1e-6)
    assert (mixed["logit_a"] - mixed["logit_b"]).abs().max() > 1e-4  # two different members


def test_the_kaggle_notebook_runs_the_ensemble_offline(
    head_on_ensemble, tiny_data, tmp_path, monkeypatch
):
    bundle = kaggle_bundle.build_code(tmp_path / "bundle", "tester", head_on_ensemble)
    runs = bundle / "runs" / "rsna"
    assert (runs / "stage2_ensemble" / "ensemble.json").is_file()
    for exp in ("stage2_fracture", "stage2_b", "head_ens", "stage1_vertebra"):
        assert sorted(p.name for p in runs.glob(f"{exp}/fold*")) == ["fold0", "fold1"], exp
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert set(CHAIN) <= set(manifest["overrides"])
    assert not [o for o in manifest["overrides"] if o.startswith(("output_dir", "data_dir"))]
    root = tmp_path / "kaggle"
    comp = kaggle_tree(
        root, bundle, root / "input" / SLUG, tiny_data / "test_images", tiny_data / "train.csv"
    )
    shutil.copy(tiny_data / "test.csv", comp / "test.csv")
    log = run_notebook(root, monkeypatch)
    assert "chain failed" not in log
    notebook = read_submission(root, pd.read_csv(comp / "test.csv"))
    local = tmp_path / "inference.csv"
    ov = [o for o in head_on_ensemble if not o.startswith("data_dir=")]
    inference.main(
        ["--CFG", HEAD, "--split", "test", "--data-dir", str(comp), "--out", str(local), *ov]
    )
    pd.testing.assert_frame_equal(notebook, pd.read_csv(local), check_exact=True)
