"""Pancreas multi-task pipeline: label rounding, conversion + case labels, folds, metrics, losses;
slow: the three nnU-Net trainers train a few iterations on CPU, then the one-pass predictor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from models.nnunet_trainers import pancreas_multitask as mt
from tests.conftest import preprocess
from utils import nnunet, paths
from utils.config import load_config
from utils.errors import InputError
from utils.pancreas import layout, metric
from utils.pancreas.preprocess import cases_csv, round_labels
from utils.pancreas.submit import MultitaskPredictor
from utils.pancreas.synthetic import PRESETS

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "config" / "pancreas" / "base.yaml"
TRAINERS = load_config(CFG).report.trainers


def test_round_labels_accepts_float_one_and_refuses_other_values():
    mask = np.array([0.0, 1.0000153, 2.0, 0.9996], np.float32)
    out = round_labels(mask, (0, 1, 2))
    assert out.dtype == np.uint8 and out.tolist() == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="not labels"):
        round_labels(np.array([0.0, 1.3]), (0, 1, 2))
    with pytest.raises(ValueError, match="not labels"):
        round_labels(np.array([0.0, 3.0]), (0, 1, 2))


def test_conversion_writes_case_labels_keyed_by_case_id(converted):
    _, cfg = converted
    raw = paths.nnunet_raw_dataset(cfg)
    labels = pd.read_csv(layout.nnunet_case_labels(cfg), dtype={"case_id": str})
    preset = PRESETS["tiny"]
    assert len(labels) == sum(preset.train) + sum(preset.validation)
    assert labels["case_id"].is_unique
    # the class is the subtype folder of the case's files, looked up by case id
    for row in labels.itertuples(index=False):
        folder = Path(cfg["data_dir"]) / row.split / f"subtype{row.subtype}"
        assert (folder / layout.image_name(row.case_id)).is_file()
    mask = nib.load(raw / "labelsTr" / layout.mask_name(labels["case_id"].iloc[0]))
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1, 2}
    assert len(list((raw / "imagesTs").glob("*_0000.nii.gz"))) == preset.test
    assert json.loads((raw / "dataset.json").read_text())["numTraining"] == len(labels)


def test_a_rerun_keeps_intact_files_and_rewrites_damaged_ones(converted, tmp_path):
    overrides, cfg = converted
    raw = paths.nnunet_raw_dataset(cfg)
    label = sorted((raw / "labelsTr").glob("*.nii.gz"))[0]
    image = sorted((raw / "imagesTs").glob("*.nii.gz"))[0]
    kept = sorted((raw / "labelsTr").glob("*.nii.gz"))[1]
    intact = {p: p.read_bytes() for p in (label, image)}
    for path in (label, image):  # truncated by a killed copy or a full disk
        path.write_bytes(intact[path][: len(intact[path]) // 2])
    before = kept.stat().st_mtime_ns
    preprocess("pancreas", *overrides)
    for path, content in intact.items():
        assert path.read_bytes() == content, path.name
    assert kept.stat().st_mtime_ns == before  # an intact case is not written again


def test_splits_keep_the_given_train_validation_split(converted):
    _, cfg = converted
    split = json.loads(paths.nnunet_splits(cfg).read_text())[0]
    cases = pd.read_csv(cases_csv(cfg), dtype={"case_id": str})
    assert split["val"] == sorted(cases.loc[cases["split"] == "validation", "case_id"])
    assert split["train"] == sorted(cases.loc[cases["split"] == "train", "case_id"])


def test_layout_skips_a_mask_without_image_and_odd_folders(tmp_path, caplog):
    sub = tmp_path / "train" / "subtype1"
    sub.mkdir(parents=True)
    (sub / "quiz_1_001.nii.gz").write_bytes(b"")
    (sub / "quiz_1_002_0000.nii.gz").write_bytes(b"")
    (sub / "quiz_1_002.nii.gz").write_bytes(b"")
    (tmp_path / "train" / "extra").mkdir()
    (tmp_path / "validation").mkdir()
    table = layout.scan(tmp_path)
    assert table[layout.ID].tolist() == ["quiz_1_002"] and table["subtype"].tolist() == [1]
    assert "quiz_1_001.nii.gz: no image" in caplog.text and "not a subtype<k> folder" in caplog.text


def test_dice_and_macro_f1_on_known_inputs():
    truth = np.array([0, 1, 1, 2, 2, 0])
    pred = np.array([0, 1, 2, 2, 0, 0])
    d_pancreas, d_lesion = metric.case_dice(pred, truth, lesion_label=2)
    assert d_pancreas == pytest.approx(2 * 3 / (3 + 4))
    assert d_lesion == pytest.approx(2 * 1 / (2 + 2))
    assert metric.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    # class 0: P=1 R=1/2 F1=2/3; class 1: P=1/2 R=1 F1=2/3; class 2: P=R=1/2 F1=1/2
    macro, recall = metric.classification([0, 0, 1, 2, 2], [0, 1, 1, 2, 1], 3)
    assert macro == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert recall == pytest.approx([0.5, 1.0, 0.5])
    # always class 1 (the majority of training): F1 of class 1 = 2 * (1/3) / (4/3) = 0.5, others 0
    assert metric.majority_baseline([1, 1, 0], [0, 1, 2], 3) == pytest.approx(0.5 / 3)


def test_options_come_from_the_environment(monkeypatch):
    cfg = load_config(CFG)
    monkeypatch.delenv(mt.OPTIONS_ENV, raising=False)
    with pytest.raises(RuntimeError, match="python -m utils.nnunet"):
        mt.load_options()
    monkeypatch.setenv(mt.OPTIONS_ENV, nnunet.environment(cfg, base={})[mt.OPTIONS_ENV])
    opts = mt.load_options()
    assert (opts.num_classes, opts.cls_loss) == (3, cfg.nnunet.trainer_options.cls_loss)
    monkeypatch.setenv(mt.OPTIONS_ENV, json.dumps({"num_classes": 3}))
    with pytest.raises(RuntimeError, match="missing"):
        mt.load_options()
    bad = {**json.loads(nnunet.environment(cfg, base={})[mt.OPTIONS_ENV]), "cls_norm": "group"}
    monkeypatch.setenv(mt.OPTIONS_ENV, json.dumps(bad))
    with pytest.raises(RuntimeError, match="cls_norm must be one of"):
        mt.load_options()


def test_layer_norm_classifier_scores_a_case_alone_as_in_its_batch():
    """cls_norm=layer: a case's logits (K,) depend on its own features only, the same in training
    and evaluation mode; batch norm's depend on the batch in training."""
    torch.manual_seed(0)
    feats = torch.randn(3, 8) * 5 + 2  # (B, C) pooled features
    layer = mt.ClassifierMLP(8, 3, dropout=0.0, norm="layer")
    together, alone = layer(feats)[0], layer(feats[:1].repeat(2, 1))[0]
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(layer.eval()(feats), layer.train()(feats), atol=1e-6)
    batch = mt.ClassifierMLP(8, 3, dropout=0.0, norm="batch").train()
    assert not torch.allclose(batch(feats)[0], batch(feats[:1].repeat(2, 1))[0], atol=1e-3)


def test_balanced_class_weights_and_focal_loss():
    opts = mt.MultitaskOptions("x.csv", 3, 2, 1.0, "focal", 2.0, "balanced", 0.9, "batch", 1, 1, 1)
    weights = mt.class_weights(opts, np.array([0, 1, 1, 1, 2, 2]))
    assert weights.tolist() == pytest.approx([2.0, 2 / 3, 1.0])
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    ce = torch.nn.functional.cross_entropy(logits, target, weight=weights)
    assert mt.FocalLoss(0.0, weights)(logits, target) == pytest.approx(ce.item(), rel=1e-5)
    assert mt.FocalLoss(2.0, weights)(logits, target) < ce


@pytest.mark.slow
def test_trainers_train_on_cpu_and_predictor_writes_one_row_per_test_case(converted):
    """plan -> each trainer a few iterations (found via nnUNet_extTrainer) -> report -> test CSV."""
    overrides, cfg = converted
    cli = [sys.executable, "-m"]

    def run(*args: str) -> str:
        res = subprocess.run([*cli, *args, *overrides], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    run("utils.nnunet", "--CFG", str(CFG), "plan")
    for trainer in TRAINERS:
        out = run("utils.nnunet", "--CFG", str(CFG), "train", f"nnunet.trainer={trainer}")
        assert f"Using trainer '{trainer}' from: {nnunet.TRAINER_DIR}" in out
        log = next(
            (nnunet.fold_dir(cfg.replace(**{"nnunet.trainer": trainer}), 0)).glob(
                "training_log_*.txt"
            )
        )
        assert "val classification: loss" in log.read_text()
    run("utils.pancreas.report", "--CFG", str(CFG))
    report = json.loads(paths.cv_report(cfg, "json").read_text())
    assert set(report["trainers"]) == set(TRAINERS)
    for row in report["trainers"].values():
        assert {"dsc_pancreas", "dsc_lesion", "macro_f1", "s_per_case"} <= set(row)
    out_dir = layout.predictions_dir(cfg, "test")
    run(
        "utils.pancreas.submit",
        "--CFG",
        str(CFG),
        "--input",
        str(Path(cfg["data_dir"]) / "test"),
        "--out",
        str(out_dir),
    )
    results = pd.read_csv(out_dir / "subtype_results.csv")
    tests = sorted(p.name.replace("_0000", "") for p in (Path(cfg["data_dir"]) / "test").iterdir())
    assert list(results.columns) == ["Names", "Subtype"]
    assert sorted(results["Names"]) == tests and results["Subtype"].isin([0, 1, 2]).all()
    mask = nib.load(out_dir / tests[0])
    assert (
        mask.shape
        == nib.load(Path(cfg["data_dir"]) / "test" / layout.image_name(tests[0][:-7])).shape
    )


def test_predictor_names_the_options_when_a_checkpoint_does_not_fit(monkeypatch):
    """A model trained with other trainer options (cls_norm=layer, predicted with batch) is a
    one-line InputError, not load_state_dict's traceback."""

    def mismatch(self, *args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for MultitaskNet: Missing key(s)")

    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder", mismatch)
    predictor = MultitaskPredictor(device=torch.device("cpu"))
    with pytest.raises(InputError, match="cls_norm"):
        predictor.initialize_from_trained_model_folder("model_dir", [0])
