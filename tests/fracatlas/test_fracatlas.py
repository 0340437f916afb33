"""FracAtlas: rasterisation, tolerant JPEG decoding, the label rule, conversion of a hand-made
download (not the generator's), folds -> splits_final.json, the classifier inputs and one epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import train
from tests.conftest import preprocess
from utils import paths
from utils.config import load_config
from utils.errors import InputError
from utils.fracatlas import layout
from utils.fracatlas.datasets import FractureImages
from utils.fracatlas.folds import read_cases
from utils.fracatlas.images import (
    TRUNCATED,
    UnreadableImage,
    rasterise,
    read_gray,
    resize_pair,
)
from utils.fracatlas.metric import classification_metrics, seg_metrics
from utils.fracatlas.preprocess import resolve_label
from utils.fracatlas.segment import write_splits
from utils.preprocess_data import main as preprocess_main
from utils.registry import build_dataset, build_model

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "config" / "fracatlas" / "base.yaml"


def square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# ---- rasterisation ------------------------------------------------------------------------------
def test_rasterise_unions_instances_at_original_coordinates():
    # Two instances (the second with two polygons) on a 454 x 373 (H x W) image.
    segs = [[square(10, 20, 29, 39)], [square(300, 400, 349, 419), square(20, 30, 59, 49)]]
    mask = rasterise(segs, 454, 373)
    assert mask.shape == (454, 373) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[25, 15] and mask[410, 320] and mask[40, 50]  # (row=y, col=x)
    assert not mask[5, 5] and not mask[410, 290]
    # The overlap of the first and third squares counts once (union, values stay 1).
    expected = np.zeros((454, 373), bool)
    for y0, y1, x0, x1 in ((20, 40, 10, 30), (400, 420, 300, 350), (30, 50, 20, 60)):
        expected[y0:y1, x0:x1] = True
    assert abs(int(mask.sum()) - int(expected.sum())) <= 0.1 * expected.sum()


def test_rasterise_border_large_image_and_degenerate_polygons():
    # Touching / crossing the border of a 2880 x 2304 image: clipped, no error.
    mask = rasterise([[square(2250, 2800, 2304, 2880)], [[0, 0, 100, 0, 0, 100]]], 2880, 2304)
    assert mask[-1, -1] and mask[2850, 2303] and mask[0, 0] and mask[10, 10]
    assert not mask[2700, 2200]
    # A polygon of two points is not an area: ignored; an RLE segmentation is decoded.
    assert rasterise([[[5, 5, 10, 10]]], 20, 20).sum() == 0
    rle = {"size": [20, 20], "counts": [40, 5, 355]}  # column-major: pixels 40..44 of column 2
    assert rasterise([rle], 20, 20)[:, 2].sum() == 5


def test_resize_pair_keeps_aspect_and_alignment():
    image = np.zeros((454, 373), np.uint8)
    mask = rasterise([[square(100, 200, 139, 279)]], 454, 373)
    image[mask > 0] = 200
    small_img, small_mask = resize_pair(image, mask, 160)
    assert small_img.shape == small_mask.shape == (160, 131)
    assert (small_img[small_mask > 0] > 100).all()
    assert resize_pair(image, mask, None)[0] is image


# ---- decoding -----------------------------------------------------------------------------------
def _jpeg(path: Path, shape=(60, 80)) -> Path:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, shape, dtype=np.uint8)
    cv2.imwrite(str(path), cv2.merge([gray, gray, gray]))
    return path


def test_truncated_jpeg_is_recovered_and_a_stub_is_unreadable(tmp_path):
    path = _jpeg(tmp_path / "a.jpg")
    img, status = read_gray(path)
    assert img.shape == (60, 80) and img.ndim == 2 and status == "ok"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    img, status = read_gray(path)
    assert img.shape == (60, 80) and status == TRUNCATED
    path.write_bytes(data[:64])
    with pytest.raises(UnreadableImage, match="a.jpg"):
        read_gray(path)


def test_label_rule_majority_with_folder_breaking_ties():
    assert resolve_label(1, 1, 2) == (1, "")
    assert resolve_label(0, 0, 0) == (0, "")
    label, note = resolve_label(1, 0, 1)  # the upstream fault: dataset.csv disagrees
    assert label == 1 and "dataset.csv=0" in note
    assert resolve_label(0, 1, 1)[0] == 1  # polygons + csv outvote the folder
    assert resolve_label(1, 0, 0)[0] == 0  # csv + no polygons outvote the folder
    assert resolve_label(1, None, 0)[0] == 1  # no csv row: tie -> folder


# ---- a download the project did not generate ----------------------------------------------------
def _hand_made(root: Path) -> None:
    """A FracAtlas-shaped folder written by hand: other names, extra fields, odd ids."""
    frac, neg = layout.image_dir(root, "Fractured"), layout.image_dir(root, "Non_fractured")
    frac.mkdir(parents=True)
    neg.mkdir(parents=True)
    _jpeg(frac / "Hand XR-01.JPG", (120, 90))  # space, dash and upper-case suffix
    _jpeg(frac / "leg_7.jpeg", (90, 120))
    _jpeg(neg / "hip.0042.jpg", (100, 100))
    _jpeg(neg / "shoulder_x.jpg", (80, 100))
    _jpeg(neg / "cut.jpg", (80, 100))
    (neg / "cut.jpg").write_bytes((neg / "cut.jpg").read_bytes()[:50])
    (neg / "Thumbs.db").write_bytes(b"\0")
    coco = {
        "info": {"year": 2023, "contributor": "hand"},
        "licenses": [{"id": 3, "name": "CC BY 4.0"}],
        "categories": [{"id": 1, "name": "fractured", "supercategory": "none"}],
        "images": [
            {"id": 1003, "file_name": "leg_7.jpeg", "width": 120, "height": 90, "license": 3},
            {"id": 7, "file_name": "images/Fractured/Hand XR-01.JPG", "width": 90, "height": 120},
            {"id": 55, "file_name": "shoulder_x.jpg", "width": 100, "height": 80},
        ],
        "annotations": [
            {
                "id": 900,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "attributes": {"a": 1},
                "bbox": [10, 10, 20, 20],
                "area": 400.0,
                "segmentation": [square(10, 10, 29, 29)],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [square(60, 100, 79, 109), [1, 1, 2, 2]],
            },
            {"id": 31, "image_id": 1003, "category_id": 1, "segmentation": [square(0, 0, 119, 9)]},
            {"id": 32, "image_id": 55, "category_id": 1, "segmentation": [square(5, 5, 15, 15)]},
            {"id": 33, "image_id": 4242, "category_id": 1, "segmentation": [square(1, 1, 5, 5)]},
        ],
    }
    layout.coco_json(root).parent.mkdir(parents=True)
    layout.coco_json(root).write_text(json.dumps(coco))
    rows = [  # BOM, columns in another order, shoulder_x.jpg missing, an extra unknown image
        "fractured,image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fracture_count,frontal,lateral,oblique",
        "1,Hand XR-01.JPG,1,0,0,0,0,0,0,2,1,0,0",
        "0,leg_7.jpeg,0,1,0,0,0,0,0,1,1,0,0",
        "0,hip.0042.jpg,0,0,1,0,0,0,0,0,1,0,0",
        "0,cut.jpg,0,0,1,0,0,0,0,0,1,0,0",
        "0,gone.jpg,0,0,1,0,0,0,0,0,1,0,0",
    ]
    layout.dataset_csv(root).write_bytes("\n".join(rows).encode("utf-8-sig"))
    split = layout.split_csv(root, "train").parent
    split.mkdir(parents=True)
    (split / "train.csv").write_text("image_id\nHand XR-01.JPG\n")
    (split / "test.csv").write_text("image_id\nleg_7.jpeg\n")  # no valid.csv at all


def test_conversion_of_a_hand_made_download(tmp_path, capsys):
    data, output = tmp_path / "FracAtlas", tmp_path / "output"
    out = output / "fracatlas" / "nnunet" / "raw" / "Dataset501_FracAtlas"
    _hand_made(data)
    args = ["--pipeline", "fracatlas", "--data-dir", str(data), f"output_dir={output}"]
    args += ["prep.negatives=1.0", "prep.test_negatives=0"]
    cmd = [sys.executable, "-m", "utils.preprocess_data", *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stderr
    assert "cut.jpg" in log and "Thumbs.db" in log and "4242" in log and "gone.jpg" in log
    assert "label conflict" in log and "shoulder_x.jpg" in log

    cases = pd.read_csv(out / "cases.csv", dtype=str, keep_default_na=False).set_index("image_id")
    header = (out / "cases.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == [
        "case_id",
        "image_id",
        "width",
        "height",
        "fractured",
        "n_instances",
        "split",
        "status",
    ]
    assert cases.loc["Hand XR-01.JPG", "case_id"] == "Hand_XR_01"
    assert cases.loc["cut.jpg", "status"] == "unreadable" and cases.loc["cut.jpg", "image"] == ""
    # Folder + no csv row vs COCO polygons: a 1-1 tie -> the folder (not fractured), mask empty.
    assert cases.loc["shoulder_x.jpg", "fractured"] == "0"
    assert cases.loc["shoulder_x.jpg", "conflict"] != ""
    assert cases.loc["leg_7.jpeg", ["split", "nnunet_train"]].tolist() == ["test", "0"]
    assert cases.loc["hip.0042.jpg", "nnunet_train"] == "1"  # negatives=1.0: empty mask in Tr

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "fracture": 1}
    assert dataset["channel_names"] == {"0": "zscore"} and dataset["file_ending"] == ".png"
    assert dataset["numTraining"] == len(list((out / "imagesTr").glob("*_0000.png"))) == 3
    img = cv2.imread(str(out / "imagesTr" / "Hand_XR_01_0000.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(out / "labelsTr" / "Hand_XR_01.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == mask.shape == (120, 90)  # single channel, original size
    # Union of both instances at their original coordinates; the 2-point polygon ignored.
    assert mask[20, 20] == 1 and mask[105, 70] == 1 and mask[60, 45] == 0
    assert int(mask.sum()) == pytest.approx(20 * 20 + 20 * 10, rel=0.15)
    test_mask = cv2.imread(str(out / "labelsTs" / "leg_7.png"), cv2.IMREAD_UNCHANGED)
    assert test_mask.shape == (90, 120) and test_mask[5, 60] == 1 and test_mask[50, 60] == 0
    # A rerun with the same inputs and settings is skipped.
    preprocess_main(args)
    assert "skipped" in capsys.readouterr().out
    # A converted file damaged since (a killed copy, a full disk): the conversion runs again.
    png = out / "imagesTr" / "Hand_XR_01_0000.png"
    intact = png.read_bytes()
    png.write_bytes(intact[: len(intact) // 2])
    preprocess_main(args)
    assert "skipped" not in capsys.readouterr().out and png.read_bytes() == intact


def test_conversion_errors_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*images"):
        preprocess("fracatlas", "--data-dir", str(tmp_path), f"output_dir={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


# ---- generator, folds, classifier inputs --------------------------------------------------------
def test_generator_has_the_download_layout(tiny):
    cfg = load_config(BASE, tiny)
    data = paths.data_dir(cfg)
    assert layout.dataset_csv(data).read_bytes().startswith(b"\xef\xbb\xbf")
    table = layout.read_dataset_csv(data)
    assert list(table.columns) == list(layout.CSV_COLUMNS)
    coco = json.loads(layout.coco_json(data).read_text())
    fractured = {p.name for p in layout.image_dir(data, "Fractured").glob("*.jpg")}
    assert {im["file_name"] for im in coco["images"]} == fractured
    assert all(len(a["segmentation"]) == 1 for a in coco["annotations"])
    img = cv2.imread(str(sorted(layout.image_dir(data, "Fractured").glob("*.jpg"))[0]))
    assert img.ndim == 3 and np.array_equal(img[..., 0], img[..., 1])  # grey content, 3 channels
    cases = pd.read_csv(paths.nnunet_raw_dataset(cfg) / "cases.csv")
    assert set(cases["status"]) == {"ok", "truncated_recovered", "unreadable"}
    assert (cases["width"] >= 2304).any() and 0.1 < cases["fractured"].mean() < 0.3


def test_splits_final_is_the_fold_file_on_nnunet_cases(tiny):
    cfg = load_config(BASE, tiny)
    splits = json.loads(write_splits(cfg).read_text())
    cases = read_cases(cfg)
    folds = pd.read_csv(paths.folds_csv(cfg), dtype=str).merge(cases, on="image_id")
    nn = folds[folds["nnunet_train"] == 1]
    assert len(splits) == cfg.n_folds
    for k, split in enumerate(splits):
        assert split["val"] == sorted(nn.loc[nn["fold"] == str(k), "case_id"])
        assert set(split["train"]) == set(nn["case_id"]) - set(split["val"])
    assert set(folds["split"]) == {"train"}  # test images are in no fold


def test_guided_input_shape_and_map_alignment(tiny):
    cfg = load_config(ROOT / "config" / "fracatlas" / "classifier_guided.yaml", tiny)
    with pytest.raises(InputError, match="segment"):  # no maps yet: names the step
        FractureImages.load_table(cfg)
    # Maps as segment.py writes them: here the image itself, so alignment is checkable.
    maps = layout.seg_maps(cfg, "oof")
    maps.mkdir(parents=True)
    raw = paths.nnunet_raw_dataset(cfg)
    for row in read_cases(cfg).itertuples():
        cv2.imwrite(str(maps / f"{row.case_id}.png"), cv2.imread(str(raw / row.image), 0))
    table = FractureImages.load_table(cfg)
    for train_mode in (False, True):
        ds = build_dataset(cfg, table, train=train_mode)
        sample = ds[0]
        assert sample["image"].shape == (2, 64, 64) and sample["image"].dtype == torch.float32
        image, fmap = sample["image"][0].numpy(), sample["image"][1].numpy()
        assert fmap.min() >= 0 and fmap.max() <= 1
        # Same geometry: the map (image / 255) matches the image channel ((x + 1) / 2) up to the
        # interpolation and the intensity augmentation.
        assert np.corrcoef(image.ravel(), fmap.ravel())[0, 1] > 0.8
    model = build_model(cfg)
    assert model({"image": sample["image"][None]})["logits"].shape == (1,)


def test_classifier_trains_one_tiny_epoch(tiny):
    cfg_path = ROOT / "config" / "fracatlas" / "classifier.yaml"
    train.main(["--CFG", str(cfg_path), "--fold", "0", *tiny, "device=cpu"])
    cfg = load_config(cfg_path, tiny)
    metrics = pd.read_csv(paths.run_dir(cfg, 0) / "metrics.csv")
    assert {"val_auc", "val_ap", "train_loss"} <= set(metrics.columns)
    assert np.isfinite(metrics["train_loss"]).all()
    assert paths.checkpoint_path(cfg, 0, "best").is_file()


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_conventions():
    y = np.array([0, 0, 0, 1, 1])
    m = classification_metrics(y, np.array([0.1, 0.6, 0.2, 0.7, 0.4]), 0.5)
    assert m["auc"] == pytest.approx(5 / 6) and m["sensitivity"] == 0.5
    assert m["specificity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(0.5)
    cases = pd.DataFrame(
        {
            "case_id": list("abc"),
            "dice": [0.5, np.nan, 0.0],
            "iou": [1 / 3, np.nan, 0.0],
            "n_ref": [10, 0, 0],
            "n_pred": [10, 0, 4],
        }
    )
    s = seg_metrics(cases)
    assert s["seg_dice"] == 0.5 and s["seg_dice_all"] == pytest.approx(0.5)
    assert s["fp_image_rate"] == 0.5 and s["n_seg_fractured"] == 1
