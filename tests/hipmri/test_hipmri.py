"""HipMRI pipeline: name pairing, odd shapes, float masks, Dice, one tiny epoch, mask writing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import inference
from tests.conftest import preprocess
from utils.config import load_config
from utils.fold_split import main as folds_main
from utils.hipmri import layout
from utils.hipmri.datasets import MaskWriter
from utils.hipmri.losses import CeDice
from utils.hipmri.metric import dice_counts, dice_from_counts, dice_per_class, dice_summary
from utils.hipmri.preprocess import build_table
from utils.hipmri.slices import fit, read_image, read_mask, unfit
from utils.hipmri.synthetic import generate
from utils.registry import build_dataset, build_model

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "config" / "hipmri" / "unet.yaml"
AFFINE = np.array([[-0.9, 0, 0, 115.0], [0, -1.1, 0, 70.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def write_nii(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_pair(
    root: Path, split: str, name: str, shape=(256, 128), label: float = 1.0, affine=AFFINE
):
    """A hand-made slice: image ramp + mask filled with ``label`` (float) in one block."""
    image = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) % 700
    mask = np.zeros(shape, np.float32)
    mask[100:140, 40:80] = label
    write_nii(layout.image_dir(root, split) / name, image, affine)
    write_nii(layout.mask_dir(root, split) / layout.mask_name_of(name), mask, affine)


# ---- pairing ------------------------------------------------------------------------------------
def test_pairing_by_name_not_sorted_position(tmp_path, caplog):
    # Mask k of slice k holds label k % 6, so a wrong pairing shows in the values.
    for s in (2, 10, 1):
        write_pair(tmp_path, "train", layout.image_name("004", 0, s), label=s % 6 + 0.99998 - 1)
    # An extra mask sorting first (positional pairing would shift every pair) and an extra image.
    write_nii(
        layout.mask_dir(tmp_path, "train") / "seg_003_week_0_slice_7.nii.gz",
        np.zeros((256, 128), np.float32),
    )
    write_nii(
        layout.image_dir(tmp_path, "train") / "case_009_week_1_slice_0.nii.gz",
        np.zeros((256, 128), np.int16),
    )
    (layout.image_dir(tmp_path, "train") / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        table = layout.pair_split(tmp_path, "train")
    assert table[layout.ID].tolist() == [f"case_004_week_0_slice_{s}" for s in (1, 2, 10)]
    for row in table.itertuples():
        assert Path(row.mask).name == "seg_" + Path(row.image).name[len("case_") :]
        assert read_mask(row.mask, 6).max() == int(row.slice) % 6
    assert "seg_003_week_0_slice_7.nii.gz" in caplog.text
    assert "case_009_week_1_slice_0.nii.gz" in caplog.text and "notes.txt" in caplog.text


def test_test_split_keeps_images_without_masks(tmp_path):
    write_pair(tmp_path, "test", layout.image_name("040", 0, 0))
    write_nii(
        layout.image_dir(tmp_path, "test") / layout.image_name("040", 0, 1),
        np.ones((256, 128), np.int16),
    )
    table = layout.pair_split(tmp_path, "test", masks_optional=True)
    assert table["mask"].astype(bool).tolist() == [True, False]


# ---- shapes and values --------------------------------------------------------------------------
def test_odd_shapes_trailing_axis_and_fit_roundtrip(tmp_path):
    write_pair(tmp_path, "train", layout.image_name("004", 0, 0), shape=(256, 144))
    write_pair(tmp_path, "train", layout.image_name("004", 0, 1), shape=(256, 128, 1))
    wide, trailing = sorted(layout.image_dir(tmp_path, "train").iterdir())
    assert read_image(wide).shape == (256, 144) and read_image(trailing).shape == (256, 128)
    labels = np.arange(256 * 144).reshape(256, 144) % 6
    cropped = fit(labels, (256, 128), fill=0)
    assert cropped.shape == (256, 128) and (cropped == labels[:, 8:136]).all()
    back = unfit(cropped, (256, 144))
    assert (back[:, 8:136] == labels[:, 8:136]).all() and (back[:, :8] == 0).all()
    padded = fit(labels[:, :120], (256, 128), fill=-1)
    assert (padded[:, :4] == -1).all() and (unfit(padded, (256, 120)) == labels[:, :120]).all()


def test_bad_shape_is_a_logged_skip_naming_the_file(tmp_path, caplog):
    write_pair(tmp_path, "train", layout.image_name("004", 0, 0))
    write_pair(tmp_path, "train", layout.image_name("004", 0, 1), shape=(256, 128, 3))
    with caplog.at_level(logging.WARNING):
        table = build_table(tmp_path, splits=("train",))
    assert table[layout.ID].tolist() == ["case_004_week_0_slice_0"]
    assert "case_004_week_0_slice_1.nii.gz" in caplog.text and "(256, 128, 3)" in caplog.text
    with pytest.raises(ValueError, match="case_004_week_0_slice_1"):
        read_image(layout.image_dir(tmp_path, "train") / "case_004_week_0_slice_1.nii.gz")


def test_float_masks_round_to_the_right_class(tmp_path):
    raw = np.array([[0.0, 0.99998, 2.00001], [2.99997, 4.00002, 4.99999]], np.float32)
    path = write_nii(tmp_path / "seg_004_week_0_slice_0.nii.gz", raw)
    assert read_mask(path, 6).tolist() == [[0, 1, 2], [3, 4, 5]]
    bad = write_nii(tmp_path / "seg_bad.nii.gz", np.full((2, 2), 2.5, np.float32))
    with pytest.raises(ValueError, match="seg_bad.nii.gz"):
        read_mask(bad, 6)
    out_of_range = write_nii(tmp_path / "seg_7.nii.gz", np.full((2, 2), 7.0, np.float32))
    with pytest.raises(ValueError, match="outside 0..5"):
        read_mask(out_of_range, 6)


def test_missing_split_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="keras_slices_train"):
        preprocess("hipmri", "--data-dir", str(tmp_path), f"output_dir={tmp_path / 'out'}")


# ---- Dice and loss ------------------------------------------------------------------------------
def test_dice_on_known_masks():
    truth = np.zeros((2, 4, 4), np.int64)
    pred = np.zeros((2, 4, 4), np.int64)
    truth[0, :2, :2] = 1  # 4 px of body
    pred[0, :2, :1] = 1  # 2 of them predicted
    truth[1, 0, 0] = 5  # prostate in the truth only
    pred[1, 3, 3] = 3  # bladder predicted only
    dice = dice_per_class(pred, truth)
    assert dice[1] == pytest.approx(2 * 2 / (2 + 4))
    assert dice[3] == 0.0 and dice[5] == 0.0  # present on one side only
    assert np.isnan(dice[2]) and np.isnan(dice[4])  # absent from both: no Dice
    # Pooled over slices = summed counts, not the mean of per-slice Dice.
    pooled = dice_from_counts(dice_counts(pred[0], truth[0]) + dice_counts(pred[1], truth[1]))
    np.testing.assert_allclose(pooled, dice, equal_nan=True)
    assert dice_per_class(truth, truth)[[0, 1, 5]].tolist() == [1.0, 1.0, 1.0]


def test_foreground_dice_mean_leaves_the_background_out():
    dice = np.array([0.99, 0.5, 0.6, np.nan, 0.8, 0.7])  # background, body, ..., prostate
    summary = dice_summary(dice)
    assert summary["dice_mean_fg"] == pytest.approx(np.mean([0.5, 0.6, 0.8, 0.7]))
    assert summary["dice_background"] == 0.99 and summary["dice_prostate"] == 0.7


def test_ce_dice_loss_prefers_the_truth():
    mask = torch.randint(0, 6, (2, 16, 8))
    perfect = torch.nn.functional.one_hot(mask, 6).permute(0, 3, 1, 2).float() * 20
    loss = CeDice()
    assert loss({"logits": perfect}, {"mask": mask}) < 0.05
    assert loss({"logits": torch.zeros(2, 6, 16, 8)}, {"mask": mask}) > 1.0


# ---- synthetic data + training + inference ------------------------------------------------------
def test_synthetic_layout_and_determinism(tiny, tmp_path):
    data, _, _ = tiny
    table = build_table(data)
    assert set(table["split"]) == {"train", "validate", "test"}
    assert table.groupby("patient")["split"].nunique().max() == 1  # patient-level split
    assert {128, 144} <= set(table["width"])  # tiny has a 256x144 patient
    shapes = {nib.load(p).shape for p in table["image"]}
    assert any(len(s) == 3 for s in shapes)  # and a scan stored with a trailing axis
    masks = np.concatenate([np.asarray(nib.load(p).dataobj).ravel() for p in table["mask"][:8]])
    assert masks.dtype == np.float32 and not np.array_equal(masks, np.rint(masks))
    labels = np.unique(np.concatenate([read_mask(p, 6).ravel() for p in table["mask"]]))
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    again = tmp_path / "again"
    generate(again, preset="tiny", seed=0)
    name = Path(table["image"][5]).name
    a = nib.load(data / "keras_slices_train" / name)
    b = nib.load(again / "keras_slices_train" / name)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)


def test_dataset_streams_fitted_normalised_slices(tiny):
    data, _, ov = tiny
    cfg = load_config(STAGE, ov)
    table = build_table(data, splits=("train",))
    wide = table[table["width"] == 144].iloc[:2]
    ds = build_dataset(cfg, pd.concat([wide, table.iloc[:2]]), train=True)
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["image"].shape == (1, 256, 128) and sample["mask"].shape == (256, 128)
        assert sample["mask"].dtype == torch.int64 and int(sample["mask"].max()) <= 5
    assert abs(float(ds[2]["image"].mean())) < 1.0  # z-scored, whatever the scanner scale
    model = build_model(cfg.replace(**{"model.params.scale": 0.5}))
    assert model({"image": torch.zeros(2, 1, 256, 128)})["logits"].shape == (2, 6, 256, 128)


def test_one_tiny_epoch_through_train_main(tiny):
    _, output, _ = tiny
    run = output / "hipmri" / "unet" / "fold0"
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 1 and (run / "best.pth").is_file() and (run / "curves.png").is_file()
    assert {"val_dice_prostate", "val_dice_mean_fg", "val_loss"} <= set(metrics.columns)
    assert not (output / "hipmri" / "unet" / "fold1").exists()  # given split: fold 0 only


def test_inference_writes_masks_like_the_inputs(tiny, tmp_path):
    data, output, ov = tiny
    out = tmp_path / "masks"
    inference.main(["--CFG", str(STAGE), "--split", "test", "--out", str(out), *ov])
    images = sorted(layout.image_dir(data, "test").iterdir())
    assert sorted(p.name for p in out.glob("seg_*.nii.gz")) == sorted(
        layout.mask_name_of(p.name) for p in images
    )
    for image in images:
        src, pred = nib.load(image), nib.load(out / layout.mask_name_of(image.name))
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
        values = np.asarray(pred.dataobj)
        assert values.dtype == np.uint8 and values.max() <= 5
    report = json.loads((output / "hipmri" / "cv_report.json").read_text())
    assert set(report["dice"]) == {"background", "body", "bone", "bladder", "rectum", "prostate"}
    assert report["n_test"] == len(images) and "dice_mean_foreground" in report
    assert len(pd.read_csv(out / "slices.csv")) == len(images)
    assert list((output / "hipmri" / "test_overlays").glob("*.png"))


def test_inference_on_a_hand_written_folder_with_odd_shapes(tiny, tmp_path):
    _, output, ov = tiny
    data = tmp_path / "other"
    other_affine = np.diag([1.2, 1.2, 3.0, 1.0])
    write_pair(data, "test", layout.image_name("041", 2, 3), shape=(256, 144), affine=other_affine)
    write_pair(data, "test", layout.image_name("041", 2, 10), shape=(256, 128, 1))
    write_nii(
        layout.image_dir(data, "test") / layout.image_name("042", 0, 0),
        np.ones((256, 112), np.int16),
    )  # no mask: predicted, not scored
    out = tmp_path / "pred"
    ov = [o for o in ov if not o.startswith("data_dir=")]
    inference.main(
        ["--CFG", str(STAGE), "--split", "test", "--data-dir", str(data), "--out", str(out), *ov]
    )
    for image in layout.image_dir(data, "test").iterdir():
        src, pred = nib.load(image), nib.load(out / layout.mask_name_of(image.name))
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    index = pd.read_csv(out / "slices.csv")
    assert index["dice_body"].notna().sum() == 2


def test_mask_writer_publishes_nothing_on_error(tmp_path):
    write_pair(tmp_path, "test", layout.image_name("040", 0, 0))
    table = layout.pair_split(tmp_path, "test")
    out = tmp_path / "masks"
    logits = np.zeros((1, 6, 256, 128), np.float32)
    with pytest.raises(RuntimeError), MaskWriter(out, out / "slices.csv") as writer:
        writer.write(table, {"logits": logits})
        raise RuntimeError("interrupted")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with MaskWriter(out, out / "slices.csv") as writer:
        writer.write(table, {"logits": logits})
    assert [p.name for p in sorted(out.iterdir())] == [
        "seg_040_week_0_slice_0.nii.gz",
        "slices.csv",
    ]


@pytest.mark.slow
def test_train_sh_hipmri_tiny_end_to_end(tmp_path):
    data, out = tmp_path / "data", tmp_path / "output"
    generate(data, preset="tiny", seed=1)
    env = {**os.environ, "PROFILE": "tiny", "OUTPUT": str(out), "PYTHON": sys.executable}
    cmd = ["sh", "train.sh", "hipmri", str(data)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| prostate |" in run.stdout and "report:" in run.stdout
    report = json.loads((out / "hipmri" / "cv_report.json").read_text())
    assert report["n_test"] == len(list(layout.image_dir(data, "test").iterdir()))
    assert len(list((out / "hipmri" / "test_masks").glob("seg_*.nii.gz"))) == report["n_test"]


# ---- data flow: each hand-off checked against its own files ----------------------------------------
def test_report_dice_is_rescored_from_the_written_masks(tiny, tmp_path):
    """cv_report.json's Dice = Dice pooled over the mask files it wrote vs the truth files."""
    data, output, ov = tiny
    out = tmp_path / "masks"
    inference.main(["--CFG", str(STAGE), "--split", "test", "--out", str(out), *ov])
    report = json.loads((output / "hipmri" / "cv_report.json").read_text())
    table = layout.pair_split(data, "test")
    counts = sum(
        dice_counts(
            read_mask(out / layout.mask_name_of(Path(r.image).name), 6), read_mask(r.mask, 6), 6
        )
        for r in table.itertuples()
    )
    for name, d in zip(report["dice"], dice_from_counts(counts), strict=True):
        assert report["dice"][name] == (None if np.isnan(d) else pytest.approx(d, abs=1e-4)), name


def test_reported_foreground_means_leave_the_background_out(tiny, tmp_path):
    """The test report's and the validation metric's foreground mean: the five organs, not six."""
    _, output, ov = tiny
    inference.main(["--CFG", str(STAGE), "--split", "test", "--out", str(tmp_path / "m"), *ov])
    report = json.loads((output / "hipmri" / "cv_report.json").read_text())
    organs = [report["dice"][c] for c in ("body", "bone", "bladder", "rectum", "prostate")]
    organs = [d for d in organs if d is not None]
    assert report["dice_mean_foreground"] == pytest.approx(np.mean(organs), abs=2e-4)
    assert report["dice"]["background"] != pytest.approx(np.mean(organs), abs=1e-3)
    metrics = pd.read_csv(output / "hipmri" / "unet" / "fold0" / "metrics.csv").iloc[-1]
    organs = [f"val_dice_{c}" for c in ("body", "bone", "bladder", "rectum", "prostate")]
    assert metrics["val_dice_mean_fg"] == pytest.approx(np.nanmean(metrics[organs]), rel=1e-9)
    assert metrics["val_dice_background"] != pytest.approx(metrics["val_dice_mean_fg"], abs=1e-3)


def test_patient_grouped_folds_keep_every_patient_in_one_fold(tiny, tmp_path):
    """split: folds draws folds over the slices with each patient's slices in a single fold."""
    data, _, ov = tiny
    out = tmp_path / "folds.csv"
    base = str(ROOT / "config" / "hipmri" / "base.yaml")
    folds_main(["--CFG", base, "--out", str(out), *ov, "split=folds", "n_folds=3"])
    folds = pd.read_csv(out, dtype=str)
    table = build_table(data).astype({layout.ID: str})
    merged = folds.merge(table, on=layout.ID, validate="1:1")
    assert len(merged) == len(table[table["split"] != "test"])
    assert merged["fold"].nunique() == 3
    assert merged.groupby("patient")["fold"].nunique().max() == 1
    assert merged.groupby("patient").size().min() > 1  # patients really have several slices


def test_given_split_folds_follow_the_folders_and_keep_patients_whole(tiny):
    data, output, _ = tiny
    folds = pd.read_csv(output / "hipmri" / "folds.csv", dtype=str)
    table = build_table(data).astype({layout.ID: str})
    merged = folds.merge(table, on=layout.ID, validate="1:1")
    assert len(merged) == len(table[table["split"] != "test"])
    assert (merged["fold"] == np.where(merged["split"] == "validate", "0", "1")).all()
    assert merged.groupby("patient")["fold"].nunique().max() == 1


def test_dataset_keeps_image_and_mask_aligned(tmp_path):
    """A bright block in the image and its label must land on the same pixels after fitting,
    for a slice of another size and one stored with a trailing axis."""
    cfg = load_config(STAGE, ["profile=tiny", f"data_dir={tmp_path}"])
    for shape in ((240, 150), (256, 128, 1)):
        root = tmp_path / f"d{len(shape)}"
        name = layout.image_name("050", 1, len(shape))
        image = np.zeros(shape, np.int16)
        mask = np.zeros(shape, np.float32)
        image[60:100, 20:70] = 900
        mask[60:100, 20:70] = 3
        write_nii(layout.image_dir(root, "train") / name, image)
        write_nii(layout.mask_dir(root, "train") / layout.mask_name_of(name), mask)
        sample = build_dataset(cfg, layout.pair_split(root, "train"), train=False)[0]
        bright = sample["image"][0] > sample["image"][0].mean()
        assert torch.equal(bright, sample["mask"] == 3), shape
