"""A FracAtlas classifier ensemble (utils/ensemble.py): two tiny image classifiers of other input
sizes combined on their logits, out of fold and on the test images, and fed to the CV report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

import inference
import train
from utils import ensemble, paths
from utils.config import load_config
from utils.fracatlas.layout import ID

CONFIG = "config/fracatlas"
MEMBERS = "ensemble=[{exp: classifier}, {exp: classifier_b}]"


def probs(path, key: pd.DataFrame) -> np.ndarray:
    """``prob`` of a predictions file, in the row order of ``key`` (image ids)."""
    preds = pd.read_csv(path, dtype={ID: str}).set_index(ID)
    return preds.loc[key[ID], "prob"].to_numpy(np.float64)


def test_classifier_ensemble_out_of_fold_on_test_and_in_the_report(tiny):
    for exp, size in (("classifier", 64), ("classifier_b", 48)):
        overrides = [*tiny, f"exp_name={exp}", f"dataset.params.image_size={size}"]
        train.main(["--CFG", f"{CONFIG}/classifier.yaml", *overrides])
    ens = [*tiny, MEMBERS]
    inference.main(["--CFG", f"{CONFIG}/classifier_ensemble.yaml", "--split", "oof", *ens])
    ensemble.main(["fit", "--CFG", f"{CONFIG}/classifier_ensemble.yaml", *ens])
    inference.main(["--CFG", f"{CONFIG}/classifier_ensemble.yaml", "--split", "oof", *ens])
    cfg = load_config(f"{CONFIG}/classifier_ensemble.yaml", ens)
    record = ensemble.read_record(cfg)
    assert record["metric"] == "val_auc" and record["fit"]["method"] == "hill"

    # OOF: each fold's rows combined with the weights fitted without that fold.
    oof = pd.read_csv(paths.preds_csv(cfg), dtype={ID: str})
    z = np.stack(
        [logit(probs(paths.preds_csv(cfg, e), oof)) for e in ("classifier", "classifier_b")]
    )
    w = np.array(
        [
            [record["fit"]["fold_weights"][str(k)][e] for e in ("classifier", "classifier_b")]
            for k in oof["fold"]
        ]
    )
    np.testing.assert_allclose(oof["prob"], expit((w * z.T).sum(axis=1)), rtol=1e-9)

    report = json.loads(paths.cv_report(cfg, "json").read_text())
    auc = roc_auc_score(oof["fractured"], oof["prob"])
    assert report["cls_auc_ensemble"] == pytest.approx(auc, abs=1e-4)
    rows = {r["name"]: r["score"] for r in report["ensemble"]["rows"]}
    assert list(rows) == ["classifier", "classifier_b", "mean", "classifier_ensemble"]
    assert rows["classifier_ensemble"] == pytest.approx(auc)
    assert (
        "## The classifier ensemble `classifier_ensemble`" in paths.cv_report(cfg, "md").read_text()
    )

    # Test: each member's fold mean beside it, combined with the weights fitted on every fold.
    inference.main(["--CFG", f"{CONFIG}/classifier_ensemble.yaml", "--split", "test", *ens])
    test = pd.read_csv(paths.test_preds_csv(cfg), dtype={ID: str})
    weights = record["weights"]
    z = sum(weights[e] * logit(probs(paths.test_preds_csv(cfg, e), test)) for e in weights)
    np.testing.assert_allclose(test["prob"], expit(z), rtol=1e-9)
    assert len(test) > 0 and set(test["fractured"]) <= {0, 1}
