"""Pancreas multi-task hand-offs: case-label CSV -> the trainer's classes and class weights, the
predictor's per-case rows, and the validation report re-scored from the files it scored.

Each test names the silent fault it guards. The nnU-Net parts that need a trained model (the
network, nnU-Net's own initialisation) are replaced by small stand-ins, so these tests run in
seconds; the slow test in test_pancreas.py trains the real thing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from models.nnunet_trainers import pancreas_multitask as mt
from tests.pancreas.conftest import CFG
from utils import nnunet, paths
from utils.config import load_config
from utils.pancreas import layout, report, submit

K = 3  # subtypes


def _trainer(cfg, monkeypatch, raw_root: Path) -> mt.nnUNetTrainerPancreasHead:
    """A trainer as nnU-Net builds it for ``cfg`` (options from the environment, raw root), without
    nnU-Net's own set-up: the case-label parts under test are ours."""
    env = nnunet.environment(cfg, base={})
    monkeypatch.setenv(mt.OPTIONS_ENV, env[mt.OPTIONS_ENV])
    monkeypatch.setattr(mt, "nnUNet_raw", str(raw_root))
    trainer = object.__new__(mt.nnUNetTrainerPancreasHead)
    trainer.options = mt.load_options()
    trainer.plans_manager = SimpleNamespace(dataset_name=paths.nnunet_dataset(cfg))
    trainer.device = torch.device("cpu")
    return trainer


def _relabelled(cfg, folder: Path, shift: dict[str, int]) -> dict[str, int]:
    """The converted case-label CSV rewritten into ``folder`` with each split's subtypes moved by
    ``shift[split]``, so every case's class disagrees with the ``quiz_<subtype>_...`` of its name."""
    table = pd.read_csv(layout.nnunet_case_labels(cfg), dtype={"case_id": str})
    table["subtype"] = (table["subtype"] + table["split"].map(shift)) % K
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / layout.nnunet_case_labels(cfg).name, index=False)
    return dict(zip(table["case_id"], table["subtype"], strict=True))


def _balanced(labels: list[int]) -> list[float]:
    """sklearn's balanced weights n / (K * count), written out."""
    counts = np.bincount(labels, minlength=K)
    return [len(labels) / (K * c) for c in counts]


# ---- fault: a class parsed from the file name instead of the CSV --------------------------------
def test_trainer_classes_are_the_case_label_csv_looked_up_by_case_id(
    converted,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    _, cfg = converted
    # Where nnU-Net's environment points the trainer: the conversion's CSV, = the folders.
    trainer = _trainer(cfg, monkeypatch, Path(nnunet.environment(cfg, base={})["nnUNet_raw"]))
    assert trainer.case_labels_path() == layout.nnunet_case_labels(cfg)
    scanned = layout.scan(cfg["data_dir"], with_test=False)
    assert trainer._read_case_classes() == dict(
        zip(scanned[layout.ID], scanned["subtype"], strict=True)
    )
    # A CSV that disagrees with every file name: the CSV wins, in batch order.
    rotated = _relabelled(cfg, tmp_path / paths.nnunet_dataset(cfg), {"train": 1, "validation": 1})
    trainer = _trainer(cfg, monkeypatch, tmp_path)
    trainer.case_classes = trainer._read_case_classes()
    keys = sorted(rotated, reverse=True)
    got = trainer._batch_classes({"keys": keys}).tolist()
    assert got == [rotated[k] for k in keys]
    assert any(int(k.split("_")[1]) != c for k, c in zip(keys, got, strict=True))


# ---- fault: class weights counted over every case, validation included --------------------------
def test_class_weights_are_counted_on_the_training_split_only(
    converted,  # noqa: F811
    monkeypatch,
):
    _, cfg = converted
    trainer = _trainer(cfg, monkeypatch, Path(nnunet.environment(cfg, base={})["nnUNet_raw"]))
    split = json.loads(paths.nnunet_splits(cfg).read_text())[0]
    # nnU-Net's own initialisation and split are stand-ins; the split is splits_final's fold 0.
    monkeypatch.setattr(mt.nnUNetTrainer, "initialize", lambda self: None)
    trainer.do_split = lambda: (split["train"], split["val"])
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.logger = SimpleNamespace(local_logger=SimpleNamespace(my_fantastic_logging={}))
    trainer.initialize()

    classes = pd.read_csv(layout.nnunet_case_labels(cfg), dtype={"case_id": str})
    classes = classes.set_index("case_id")["subtype"]
    expected = _balanced(classes[split["train"]].tolist())
    assert trainer.cls_loss.weight.tolist() == pytest.approx(expected)
    assert _balanced(classes.tolist()) != pytest.approx(expected)  # validation would change them
    assert trainer.cls_loss.gamma == trainer.options.focal_gamma


# ---- fault: a predictor row carrying another case's subtype or probabilities --------------------
class _Pre:
    """Stand-in preprocessing: the image's voxels as the network input."""

    def __init__(self, verbose: bool = False):
        pass

    def run_case(self, files, seg, plans, config, dataset_json):
        img = nib.load(files[0])
        return np.asarray(img.dataobj, np.float32)[None], None, {"affine": img.affine}


class _Writer:
    def write_seg(self, seg: np.ndarray, path: str, props: dict) -> None:
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), props["affine"]), path)


def _case_logits(code: int) -> list[torch.Tensor]:
    """Class logits of the two tiles of the case whose image holds ``code``."""
    base = torch.tensor([[0.3 * code, 1.5 - code, 0.7 * code - 0.5]])
    return [base, base + torch.tensor([[0.4, -0.2, 0.1]])]


def _stand_in_predictor() -> submit.MultitaskPredictor:
    """The real MultitaskPredictor (hook, averaging, writing) around a stand-in network."""
    predictor = object.__new__(submit.MultitaskPredictor)
    predictor._logits = []
    predictor.configuration_manager = SimpleNamespace(preprocessor_class=_Pre)
    predictor.plans_manager = SimpleNamespace(image_reader_writer_class=_Writer)
    predictor.dataset_json, predictor.label_manager = {}, None
    net = SimpleNamespace(last_logits=None)

    def forward(data: torch.Tensor) -> torch.Tensor:
        code = int(data.max())
        for tile in _case_logits(code):  # one forward (and hook call) per sliding-window tile
            net.last_logits = tile
            predictor._collect(net, None, None)
        seg = torch.zeros((K, *data.shape[1:]))
        seg[code % K][data[0] > 0] = 1.0  # the mask: label (code % 3) where the image is bright
        return seg

    predictor.predict_logits_from_preprocessed_data = forward
    return predictor


def test_predictor_rows_hold_their_own_cases_subtype_and_mask(tmp_path, monkeypatch):
    codes = {"quiz_000": 2, "quiz_007": 1, "quiz_010": 0, "quiz_101": 1}
    images = tmp_path / "in"
    images.mkdir()
    for case, code in codes.items():
        vol = np.zeros((6, 5, 4), np.int16)
        vol[1:4, 1 + code : 3 + code] = code + 1  # where and how bright: the case's own code
        nib.save(nib.Nifti1Image(vol, np.eye(4)), images / layout.image_name(case))
    monkeypatch.setattr(submit, "load_predictor", lambda cfg, trainer: _stand_in_predictor())
    monkeypatch.setattr(
        submit,
        "convert_predicted_logits_to_segmentation_with_correct_shape",
        lambda logits, *args: logits.argmax(0).numpy(),
    )
    out = tmp_path / "out"
    out.mkdir()
    submit.predict_images(load_config(CFG), "any", submit.input_images(images), out)

    results = pd.read_csv(out / submit.RESULTS_CSV)
    cases = pd.read_csv(out / submit.CASES_CSV).set_index("Names")
    assert sorted(results["Names"]) == sorted(layout.mask_name(c) for c in codes)
    for case, code in codes.items():
        name = layout.mask_name(case)
        probs = torch.cat([torch.softmax(t, 1) for t in _case_logits(code + 1)]).mean(0).numpy()
        assert cases.loc[name, [f"p{k}" for k in range(K)]].tolist() == pytest.approx(
            probs, abs=1e-4
        )
        assert results.set_index("Names").loc[name, "Subtype"] == probs.argmax()
        mask = np.asarray(nib.load(out / name).dataobj)
        image = np.asarray(nib.load(images / layout.image_name(case)).dataobj)
        assert np.array_equal(mask, np.where(image > 0, (code + 1) % K, 0)), case
    assert results["Subtype"].nunique() > 1


# ---- fault: the report scoring something else than the files it wrote ---------------------------
def _fake_predict_images(cfg, trainer: str, images, out_dir: Path) -> pd.DataFrame:
    """Stand-in for the predictor: per validation case a mask that is the converted label spoiled
    in a case- and trainer-dependent way, and a subtype; written as predict_images writes them."""
    raw = paths.nnunet_raw_dataset(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    shift = cfg["report"]["trainers"].index(trainer)
    truths = pd.read_csv(layout.nnunet_case_labels(cfg), dtype={"case_id": str})
    truths = dict(zip(truths["case_id"], truths["subtype"], strict=True))
    rows = []
    for i, image in enumerate(images):
        name = layout.mask_name(layout.case_of_image(image))
        label = nib.load(raw / "labelsTr" / name)
        pred = np.asarray(label.dataobj).copy()
        if (i + shift) % 2:
            pred[pred == 2] = 1  # lesion missed, pancreas kept
        pred = np.roll(pred, (i + shift) % 3, axis=0)
        nib.save(nib.Nifti1Image(pred, label.affine), out_dir / name)
        truth = truths[name.removesuffix(layout.MASK_SUFFIX)]
        subtype = truth if (i + shift) % 2 else (truth + 1 + shift) % K  # right half the time
        rows.append({"Names": name, "Subtype": subtype, "seconds": 0.1 * (i + 1)})
    table = pd.DataFrame(rows)
    table[["Names", "Subtype"]].to_csv(out_dir / submit.RESULTS_CSV, index=False)
    return table


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


def _rescore(cfg, trainer: str, classes: dict[str, int]) -> dict:
    """DSC and macro-F1 of one trainer from its prediction folder, written out here."""
    folder = layout.predictions_dir(cfg, f"validation_{trainer}")
    results = pd.read_csv(folder / submit.RESULTS_CSV)
    labels = paths.nnunet_raw_dataset(cfg) / "labelsTr"
    dsc = []
    for name in results["Names"]:
        pred = np.asarray(nib.load(folder / name).dataobj)
        truth = np.asarray(nib.load(labels / name).dataobj)
        dsc.append((_dice(pred > 0, truth > 0), _dice(pred == 2, truth == 2)))
    truth = [classes[n.removesuffix(layout.MASK_SUFFIX)] for n in results["Names"]]
    f1 = f1_score(truth, results["Subtype"], labels=list(range(K)), average="macro")
    return {"dsc": np.mean(dsc, axis=0), "macro_f1": f1, "n": len(results)}


def test_report_numbers_rescored_from_the_written_masks_and_results(
    converted,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    overrides, cfg = converted
    out = tmp_path / "out"
    shutil.copytree(Path(cfg["output_dir"]), out, symlinks=True)
    overrides = [*overrides, f"output_dir={out}"]
    cfg = load_config(CFG, overrides)
    # CSV != file names; the majority class of train/ is not that of validation/.
    classes = _relabelled(cfg, layout.nnunet_case_labels(cfg).parent, {"train": 1, "validation": 2})
    monkeypatch.setattr(report, "predict_images", _fake_predict_images)
    report.main(["--CFG", str(CFG), *overrides])
    written = json.loads(paths.cv_report(cfg, "json").read_text())

    train, val = (json.loads(paths.nnunet_splits(cfg).read_text())[0][k] for k in ("train", "val"))
    for trainer, row in written["trainers"].items():
        redo = _rescore(cfg, trainer, classes)
        assert row["n_cases"] == redo["n"] == len(val)
        assert row["dsc_pancreas"] == pytest.approx(redo["dsc"][0], abs=1e-4), trainer
        assert row["dsc_lesion"] == pytest.approx(redo["dsc"][1], abs=1e-4), trainer
        assert row["macro_f1"] == pytest.approx(redo["macro_f1"], abs=1e-4), trainer
        assert redo["dsc"][0] != pytest.approx(redo["dsc"][1], abs=1e-3)
    majority = np.bincount([classes[c] for c in train], minlength=K).argmax()
    assert majority != np.bincount([classes[c] for c in val], minlength=K).argmax()
    baseline = f1_score(
        [classes[c] for c in val],
        [majority] * len(val),
        average="macro",
        labels=list(range(K)),
        zero_division=0,
    )
    assert written["majority_baseline_macro_f1"] == pytest.approx(baseline, abs=1e-4)
