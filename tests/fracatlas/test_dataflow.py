"""FracAtlas hand-offs: download -> training label, nnU-Net folds -> OOF / test maps -> the guided
classifier's input (same fold, same geometry), and the CV report re-scored from its own files.

Each test names the silent fault it guards: the pipeline would still run and write plausible
files with the fault in place. nnU-Net itself is replaced by a stand-in that writes, for every
image it is given, a probability map whose value says which fold models predicted it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from train import split_table
from utils import nnunet, paths
from utils.config import load_config
from utils.fracatlas import layout, segment
from utils.fracatlas.datasets import FractureImages
from utils.fracatlas.folds import read_cases
from utils.fracatlas.report import write_report
from utils.registry import build_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "fracatlas"
ENSEMBLE = 250  # map value (uint8) the stand-in writes for a prediction by several folds


def _fold_code(fold: int) -> int:
    """Map value (uint8) the stand-in writes for a prediction by the single model of ``fold``."""
    return 40 * (fold + 1)


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _fake_nnunet(calls: dict):
    """Stand-in for ``nnunet.run(nnUNetv2_predict ...)``: records the cases given to each set of
    folds and writes ``<case>.npz`` whose fracture probability encodes those folds."""

    def run(cmd, env):
        assert cmd[0] == "nnUNetv2_predict" and "--save_probabilities" in cmd
        folds = tuple(int(f) for f in cmd[cmd.index("-f") + 1 : cmd.index("-npp")])
        value = _fold_code(folds[0]) if len(folds) == 1 else ENSEMBLE
        out = Path(_arg(cmd, "-o"))
        out.mkdir(parents=True, exist_ok=True)
        for image in sorted(Path(_arg(cmd, "-i")).glob("*_0000.png")):
            case = image.name.removesuffix("_0000.png")
            calls.setdefault(folds, []).append(case)
            shape = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).shape
            probs = np.zeros((2, 1, *shape), np.float32)
            probs[1] = value / 255
            np.savez(out / f"{case}.npz", probabilities=probs)

    return run


def _map_value(path: str) -> set[int]:
    return set(np.unique(cv2.imread(path, cv2.IMREAD_GRAYSCALE)).tolist())


# ---- fault: a map predicted by a fold model that trained on the image ---------------------------
@pytest.fixture(scope="module")
def mapped(tiny, tmp_path_factory):  # noqa: F811
    """OOF and test maps written by segment.py around the nnU-Net stand-in: (cfg, calls)."""
    cfg = load_config(CONFIG / "classifier_guided.yaml", tiny)
    for k in nnunet.folds(cfg):
        checkpoint = nnunet.fold_dir(cfg, k) / "checkpoint_final.pth"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.touch()
    calls: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nnunet, "run", _fake_nnunet(calls))
        for split in ("oof", "test"):
            cases = segment.predict(cfg, split)
            segment.write_maps(
                cases, layout.seg_predictions(cfg, split), layout.seg_maps(cfg, split)
            )
    return cfg, calls


def test_oof_maps_come_from_the_fold_model_that_never_trained_on_the_image(mapped):
    cfg, calls = mapped
    cases = read_cases(cfg).set_index(layout.ID)
    folds = pd.read_csv(paths.folds_csv(cfg), dtype={layout.ID: str})
    splits = json.loads(segment.write_splits(cfg).read_text())
    n = len(splits)
    assert set(calls) == {*((k,) for k in range(n)), tuple(range(n))}
    for k in range(n):
        fold_cases = cases.loc[folds.loc[folds.fold == k, layout.ID], "case_id"]
        assert sorted(calls[(k,)]) == sorted(fold_cases)  # every pool image of fold k, once
        assert not set(fold_cases) & set(splits[k]["train"])  # model k never saw them
    test = cases[cases.split == "test"]
    assert sorted(calls[tuple(range(n))]) == sorted(test.case_id)  # the fold ensemble

    # What the guided classifier reads: pool images their OOF map, test images the ensemble's.
    table = FractureImages.load_table(cfg)
    assert len(table) == len(folds)
    fold_of = folds.set_index(layout.ID).fold
    for row in table.itertuples():
        assert _map_value(row.map) == {_fold_code(fold_of[row.image_id])}, row.image_id
    test_table = FractureImages.test_table(cfg)
    assert sorted(test_table.case_id) == sorted(test.case_id)
    assert all(_map_value(m) == {ENSEMBLE} for m in test_table["map"])


def test_classifier_validation_fold_gets_the_maps_of_the_same_nnunet_fold(mapped):
    cfg, _ = mapped
    splits = json.loads(paths.nnunet_splits(cfg).read_text())
    for k, split in enumerate(splits):
        train, val = split_table(cfg, k)
        assert {v for m in val["map"] for v in _map_value(m)} == {_fold_code(k)}
        assert set(split["val"]) <= set(val.case_id)  # nnU-Net's val = classifier's, on its cases
        assert not set(split["val"]) & set(train.case_id)


# ---- fault: the map shifted against the image (padding, stretch, augmentation) ------------------
def _block_pair(root: Path, shape: tuple[int, int]) -> tuple[str, str]:
    """A dark image with a bright off-centre block and its map (1.0 on the same block)."""
    image = np.zeros(shape, np.uint8)
    fmap = np.zeros(shape, np.uint8)
    h, w = shape
    rows, cols = slice(h // 5, h // 2), slice(w // 6, w // 2)
    image[rows, cols] = 200
    fmap[rows, cols] = 255
    png, map_png = root / f"img_{h}x{w}.png", root / f"map_{h}x{w}.png"
    cv2.imwrite(str(png), image)
    cv2.imwrite(str(map_png), fmap)
    return str(png), str(map_png)


def _overlap(sample) -> float:
    """IoU of the block as seen in the image channel and in the map channel."""
    image, fmap = sample["image"][0].numpy(), sample["image"][1].numpy()
    in_map = fmap > 0.5
    mid = (image[in_map].mean() + image[~in_map].mean()) / 2  # survives brightness / contrast
    in_image = image > mid
    return float((in_map & in_image).sum() / (in_map | in_image).sum())


def test_guided_sample_map_covers_the_same_pixels_as_the_image(tmp_path):
    cfg = load_config(CONFIG / "classifier_guided.yaml", ["profile=tiny"])
    rows = [_block_pair(tmp_path, s) for s in ((90, 150), (150, 90))]  # wide and tall
    table = pd.DataFrame(rows * 4, columns=["png", "map"]).assign(fractured=1)
    plain = build_dataset(cfg, table, train=False)
    for i in range(2):
        assert _overlap(plain[i]) > 0.9
    augmented = build_dataset(cfg, table, train=True)
    moved = 0
    for i in range(len(table)):
        sample = augmented[i]
        assert _overlap(sample) > 0.85, i
        moved += not np.allclose(sample["image"][1], plain[i % 2]["image"][1])
    assert moved >= 3  # the augmentation did move the geometry


# ---- fault: a training label that is not the documented rule on the download --------------------
def _rule(folder: int, csv: int | None, polygons: int) -> int:
    """docs/fracatlas.md, written out: majority of folder, dataset.csv, "has polygons"; a source
    that is missing does not vote; a tie goes to the folder."""
    votes = [folder, int(polygons > 0)] + ([] if csv is None else [csv])
    ones = sum(votes)
    return folder if 2 * ones == len(votes) else int(2 * ones > len(votes))


def test_training_label_is_the_label_rule_on_the_download(tiny):  # noqa: F811
    cfg = load_config(CONFIG / "classifier.yaml", tiny)
    data = paths.data_dir(cfg)
    folder = layout.scan_images(data).set_index(layout.ID).folder_label
    csv = layout.read_dataset_csv(data).set_index(layout.ID).fractured
    polygons = layout.read_coco(data).segmentations
    # Every readable image: the training pool and the test images (their labels score the test).
    table = pd.concat([FractureImages.load_table(cfg), FractureImages.test_table(cfg)])
    assert len(table) == len(read_cases(cfg))
    ds = build_dataset(cfg, table, train=False)
    disagree = 0
    for i, image_id in enumerate(table[layout.ID]):
        c = csv.get(image_id)
        expected = _rule(
            int(folder[image_id]), None if c is None else int(c), len(polygons[image_id])
        )
        assert float(ds[i]["fractured"]) == expected, image_id
        disagree += c is not None and int(c) != expected
    assert disagree >= 1  # the generator's mislabelled dataset.csv row


# ---- fault: the report reading another number than its own files hold ---------------------------
def _write_classifier_preds(cfg, exp: str, seed: int) -> None:
    """preds_oof.csv as inference.py writes it: key columns from cases.csv, ``prob``, ``fold``."""
    pool = read_cases(cfg)
    pool = pool[pool.split == "train"]
    rng = np.random.default_rng(seed)
    prob = np.clip(0.3 * pool.fractured + rng.uniform(0, 0.8, len(pool)), 0, 1)
    preds = pool[[layout.ID, "case_id", "fractured"]].assign(prob=prob, fold=0)
    path = paths.preds_csv(cfg, exp)
    path.parent.mkdir(parents=True, exist_ok=True)
    preds.to_csv(path, index=False)


def _write_seg_predictions(cfg, cases: pd.DataFrame) -> None:
    """OOF masks that differ from the truth: shifted, emptied, or a false blob on a negative."""
    raw, out = paths.nnunet_raw_dataset(cfg), layout.seg_predictions(cfg, "oof")
    out.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(cases[cases.label != ""].itertuples()):
        truth = cv2.imread(str(raw / row.label), cv2.IMREAD_GRAYSCALE)
        pred = np.roll(truth, 2 * (i % 4), axis=1)
        if i % 5 == 1:
            pred[:] = 0
        if row.fractured == 0 and i % 3 == 0:
            pred[5:15, 5:15] = 1
        cv2.imwrite(str(out / f"{row.case_id}.png"), pred)


def _dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter, p, t = int((pred & truth).sum()), int(pred.sum()), int(truth.sum())
    if p + t == 0:
        return np.nan, np.nan
    return 2 * inter / (p + t), inter / (p + t - inter)


def test_report_numbers_rescored_from_its_own_files(tiny, tmp_path):  # noqa: F811
    cfg = load_config(CONFIG / "base.yaml", [*tiny, f"output_dir={tmp_path}"])
    src = load_config(CONFIG / "base.yaml", tiny)
    # A private output folder: the converted set and the fold file, then our own prediction files.
    paths.nnunet_raw_dataset(cfg).parent.mkdir(parents=True)
    paths.nnunet_raw_dataset(cfg).symlink_to(paths.nnunet_raw_dataset(src))
    paths.folds_csv(cfg).write_bytes(paths.folds_csv(src).read_bytes())
    _write_classifier_preds(cfg, cfg.report.plain, seed=1)
    _write_classifier_preds(cfg, cfg.report.guided, seed=2)
    cases = segment.split_cases(cfg, "oof")
    _write_seg_predictions(cfg, cases)
    segment.evaluate(cfg, cases, "oof")  # nnUNetv2_evaluate_simple on the files just written
    report = write_report(cfg)
    assert json.loads(paths.cv_report(cfg, "json").read_text()) == report

    truth = read_cases(cfg).set_index(layout.ID).fractured
    for key, exp in (("cls_auc", cfg.report.plain), ("cls_auc_mask_guided", cfg.report.guided)):
        preds = pd.read_csv(paths.preds_csv(cfg, exp), dtype={layout.ID: str})
        auc = roc_auc_score(truth[preds[layout.ID]], preds.prob)
        assert report[key] == pytest.approx(auc, abs=1e-4), key
    assert report["cls_auc"] != report["cls_auc_mask_guided"]

    raw, pred_dir = paths.nnunet_raw_dataset(cfg), layout.seg_predictions(cfg, "oof")
    rows = []
    for row in cases[cases.label != ""].itertuples():
        t = cv2.imread(str(raw / row.label), cv2.IMREAD_GRAYSCALE) > 0
        p = cv2.imread(str(pred_dir / f"{row.case_id}.png"), cv2.IMREAD_GRAYSCALE) > 0
        rows.append((t.any(), *_dice_iou(p, t)))
    seg = pd.DataFrame(rows, columns=["fractured", "dice", "iou"])
    assert (seg.dice.isna() | (seg.dice < 1)).any() and seg.fractured.any()
    fractured = seg[seg.fractured]
    assert report["seg_dice"] == pytest.approx(fractured.dice.mean(), abs=1e-4)
    assert report["seg_iou"] == pytest.approx(fractured.iou.mean(), abs=1e-4)
    assert report["seg_dice_all"] == pytest.approx(seg.dice.fillna(1.0).mean(), abs=1e-4)
