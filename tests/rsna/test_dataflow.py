"""What flows between the stages: cache orientation, 2.5D stacks, stage-2 crops and sequences,
losses against the metric, OOF fold routing, the CV report and the submission fills.

Each test names the silent fault it guards; all of them keep `make test` green when broken
without these tests (the pipeline still runs and writes plausible files).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import inference
import train
from tests.conftest import preprocess
from tests.rsna.conftest import tiny_overrides
from utils import paths
from utils.config import load_config
from utils.folds import load_folds
from utils.predict import load_models, predict_frame, run_config
from utils.registry import build_loss
from utils.rsna import layout
from utils.rsna.datasets import (
    StudyLogits,
    VertebraSequences,
    VertebraSlices,
    slice_table,
    study_logit_table,
    train_priors,
)
from utils.rsna.dicom import window
from utils.rsna.localize import main as stage2_labels_main
from utils.rsna.metric import TARGETS, per_target_logloss, score
from utils.rsna.postprocess import crossfit_platt, fit_platt, implausible, reference, shrink
from utils.rsna.report import choose_patient_level, cv_report, stage2_wide
from utils.rsna.submit import read_test_rows, studies_to_predict, write_submission
from utils.rsna.synthetic.generator import PRESETS, StudySpec, write_study
from utils.rsna.synthetic.writers import write_slice

VERT = [f"C{i}" for i in range(1, 8)]
TARGET_ORDER = ["patient_overall", *VERT]  # written out here, not taken from the code
BOX = ["x0", "y0", "x1", "y1"]
BONE = (400.0, 1800.0)  # the cache window of every profile


def _u8(image: torch.Tensor) -> np.ndarray:
    """Dataset image tensor in [-1, 1] back to the uint8 cache values."""
    return np.rint((image.numpy().astype(np.float64) + 1.0) * 127.5).astype(int)


def _save_volume(out_dir, uid: str, vol: np.ndarray) -> None:
    path = layout.volume_path(out_dir / "rsna" / "prep", uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vol)


def _dataset_cfg(out_dir) -> dict:
    return {"seed": 0, "output_dir": str(out_dir), "pipeline": "rsna"}


def _z_volume(n: int, rows: int, cols: int, scale: int = 10) -> np.ndarray:
    """(n, rows, cols) uint8 volume whose slice z holds the constant value scale * z."""
    return np.broadcast_to((np.arange(n) * scale).astype(np.uint8)[:, None, None], (n, rows, cols))


# ---- fault 1: the submission's prior fill ---------------------------------------------------------
def test_submission_rows_without_prediction_get_their_targets_train_prevalence(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # C1..C7 of 10 train studies: study i has C_j fractured when i < j (prevalence j / 10), so
    # every target has its own prevalence, none 0 or 1 (patient_overall 0.7, like C7; the priors
    # are their add-one smoothed versions).
    c = (np.arange(10)[:, None] < np.arange(1, 8)[None, :]).astype(int)
    labels = pd.DataFrame(c, columns=VERT)
    labels.insert(0, "patient_overall", c.max(axis=1))
    labels.insert(0, "StudyInstanceUID", [f"1.2.{k}" for k in range(10)])
    labels.to_csv(data / "train.csv", index=False)
    train = pd.read_csv(data / "train.csv")[TARGET_ORDER]
    prevalence = (train.sum() + 1) / (len(train) + 2)  # add-one smoothed
    assert prevalence.between(0.1, 0.9).all() and prevalence.nunique() == 7

    seen, blind = "9.9.1", "9.9.2"
    rows = pd.DataFrame(
        [(f"{u}_{t}", u, t) for u in (blind, seen) for t in reversed(TARGET_ORDER)],
        columns=["row_id", "StudyInstanceUID", "prediction_type"],
    )
    wide = pd.DataFrame(
        [[seen, *np.linspace(0.11, 0.88, 8)]], columns=["StudyInstanceUID", *TARGETS]
    )
    priors = train_priors({"data_dir": str(data)})
    sub = write_submission(rows, wide, priors, tmp_path / "submission.csv")

    assert sub.row_id.tolist() == rows.row_id.tolist()
    got = sub.set_index("row_id").fractured
    for t in TARGET_ORDER:
        assert got[f"{blind}_{t}"] == pytest.approx(prevalence[t], abs=1e-12), t
        assert got[f"{seen}_{t}"] == pytest.approx(float(wide.iloc[0][t]), abs=1e-12), t
    written = pd.read_csv(tmp_path / "submission.csv").set_index("row_id").fractured
    np.testing.assert_allclose(written.loc[got.index], got, rtol=1e-12)


# ---- the patient head's input: a vertebra without a stage-2 prediction ----------------------------
def test_a_vertebra_without_stage2_prediction_enters_the_head_at_its_train_prior(tiny_cfg):
    """Its logit is its own target's prior logit (not 0, i.e. p = 0.5) and ``missing`` is 1."""
    priors = dict(zip(TARGET_ORDER, [0.45, 0.04, 0.12, 0.06, 0.05, 0.09, 0.15, 0.2], strict=True))
    given = {v: 0.3 * (i + 1) - 1.0 for i, v in enumerate(VERT)}
    found = [v for v in VERT if v != "C3"]  # C3 of study A and every vertebra of study B: none
    preds = pd.DataFrame(
        [("1.2.A", v, given[v]) for v in reversed(found)],
        columns=["StudyInstanceUID", "vertebra", "logit"],
    )
    table = study_logit_table(preds, priors, ["1.2.A", "1.2.B"])
    ds = StudyLogits(table, tiny_cfg("patient_head"), train=False)
    for i, uid in enumerate(["1.2.A", "1.2.B"]):
        sample = ds[i]
        assert table.StudyInstanceUID[i] == uid
        for j, v in enumerate(VERT):
            known = uid == "1.2.A" and v in found
            expected = given[v] if known else np.log(priors[v] / (1 - priors[v]))
            assert float(sample["logits"][j]) == pytest.approx(expected, abs=1e-6), (uid, v)
            assert float(sample["missing"][j]) == (0.0 if known else 1.0), (uid, v)


# ---- stage-2 labels: each vertebra's flag by column name ----------------------------------------
def test_stage2_sequences_take_each_vertebras_label_by_name(tmp_path):
    """train.csv columns are matched by name: C_i's sequence gets C_i's flag, whatever the order
    of the columns (the competition's is StudyInstanceUID, patient_overall, C1..C7)."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    uids = [f"1.2.{k}" for k in range(4)]
    flags = np.array([[(k + i) % 3 == 0 for i in range(7)] for k in range(4)], int)
    labels = pd.DataFrame(flags, columns=VERT)
    labels.insert(0, "patient_overall", flags.max(axis=1))
    labels.insert(0, "StudyInstanceUID", uids)
    ranges = pd.DataFrame(
        [(u, v, 3, 9, 0.1, 0.1, 0.9, 0.9) for u in uids for v in VERT],
        columns=["StudyInstanceUID", "vertebra", "start", "end", *BOX],
    )
    cfg = {"data_dir": str(data), "output_dir": str(out), "pipeline": "rsna"}
    layout.stage2_labels_csv(cfg, "oof").parent.mkdir(parents=True)
    ranges.to_csv(layout.stage2_labels_csv(cfg, "oof"), index=False)
    for columns in (
        list(labels.columns),
        ["C4", "StudyInstanceUID", *VERT[::-1][:-1], "patient_overall"],
    ):
        columns = [c for c in dict.fromkeys(columns + list(labels.columns))]
        labels[columns].to_csv(data / "train.csv", index=False)
        table = VertebraSequences.load_table(cfg)
        assert len(table) == 4 * 7
        for row in table.itertuples():
            k, i = uids.index(row.StudyInstanceUID), VERT.index(row.vertebra)
            assert row.fractured == flags[k, i], (row.StudyInstanceUID, row.vertebra, columns)


# ---- fault 2: the placeholder test.csv fallback ---------------------------------------------------
def _test_layout(root, test_uids: list[str], present: list[str]):
    root.mkdir()
    rows = [(f"{u}_{t}", u, t) for u in test_uids for t in ("C1", "patient_overall")]
    pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"]).to_csv(
        root / "test.csv", index=False
    )
    for uid in present:
        (root / "test_images" / uid).mkdir(parents=True)
        (root / "test_images" / uid / "1.dcm").write_bytes(b"")
    return rows


def test_placeholder_test_csv_predicts_the_studies_in_test_images_and_keeps_its_rows(tmp_path):
    present = ["1.2.826.7", "1.2.826.30", "1.2.826.5"]
    listed = _test_layout(tmp_path / "placeholder", ["1.2.826.999"], present)
    rows = read_test_rows(tmp_path / "placeholder")
    assert list(rows.itertuples(index=False, name=None)) == listed
    assert studies_to_predict(rows, tmp_path / "placeholder") == sorted(present)

    # A test.csv naming studies that are present (even with one absent): those, in its order.
    listed = _test_layout(
        tmp_path / "real", ["1.2.826.5", "1.2.826.404", "1.2.826.30"], ["1.2.826.30", "1.2.826.5"]
    )
    rows = read_test_rows(tmp_path / "real")
    assert list(rows.itertuples(index=False, name=None)) == listed
    assert studies_to_predict(rows, tmp_path / "real") == ["1.2.826.5", "1.2.826.30"]


# ---- fault 3: reversed studies in the volume cache -------------------------------------------------
def _write_ramp_study(folder, uid: str, reversed_numbers: bool, n: int = 6) -> list[float]:
    """Slice k (head -> feet, IPP z = 100 - 2.5 k) of constant HU; file numbers ascend feet ->
    head when ``reversed_numbers``. Returns the HU of each slice head -> feet."""
    hus = [-400.0 + 250.0 * k for k in range(n)]
    for k, hu in enumerate(hus):
        number = n - k if reversed_numbers else k + 1
        write_slice(
            folder / uid / f"{number}.dcm",
            np.full((12, 20), hu, np.float32),
            study_uid=uid,
            series_uid=f"{uid}.1",
            sop_uid=f"{uid}.1.{number}",
            instance_number=number,
            position=(-5.0, -3.0, 100.0 - 2.5 * k),
        )
    return hus


def test_reversed_studies_are_cached_head_to_feet(tmp_path):
    data, prep = tmp_path / "data", tmp_path / "out" / "rsna" / "prep"
    images = data / "train_images"
    normal, rev = "1.2.3.10", "1.2.3.11"
    hus = _write_ramp_study(images, normal, reversed_numbers=False)
    _write_ramp_study(images, rev, reversed_numbers=True)
    # One synthetic segmented study written twice: file numbers head -> feet, then feet -> head.
    spec = StudySpec("1.2.3.20", "train", 0, (0, 1, 0, 0, 0, 0, 0), segmented=True)
    write_study(spec, PRESETS["tiny"], 0, data)
    write_study(replace(spec, uid="1.2.3.21", reversed=True), PRESETS["tiny"], 0, data)
    uids = [normal, rev, "1.2.3.20", "1.2.3.21"]
    pd.DataFrame({"StudyInstanceUID": uids, **{t: 0 for t in TARGET_ORDER}}).to_csv(
        data / "train.csv", index=False
    )
    preprocess("rsna", "--data-dir", str(data), f"output_dir={tmp_path / 'out'}", "profile=tiny")
    vol = {u: np.load(layout.volume_path(prep, u)) for u in uids}
    studies = pd.read_csv(layout.studies_csv(prep)).set_index("StudyInstanceUID")
    assert studies.loc[uids, "reversed"].tolist() == [False, True, False, True]

    # The ramp: slice k of the cache is the k-th slice from the head, whatever the numbering.
    expected = np.stack([np.full((64, 64), window(np.float32(h), *BONE)) for h in hus])
    assert len(np.unique(expected[:, 0, 0])) == len(hus)
    np.testing.assert_array_equal(vol[normal], expected)
    np.testing.assert_array_equal(vol[rev], expected)

    # The synthetic pair: identical cache and identical stage-1 labels (C1 above C7).
    np.testing.assert_array_equal(vol["1.2.3.21"], vol["1.2.3.20"])
    labels = pd.read_csv(layout.stage1_labels_csv(prep))
    a, b = (
        labels[labels.StudyInstanceUID == u].drop(columns=["StudyInstanceUID", "file_number"])
        for u in ("1.2.3.20", "1.2.3.21")
    )
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert a.loc[a.C1 > 0, "slice"].mean() < a.loc[a.C7 > 0, "slice"].mean()


# ---- fault 4: the stage-2 crop on a non-square study ----------------------------------------------
@pytest.mark.parametrize(
    ("box", "rows", "cols"),
    [
        ((16 / 64, 10 / 40, 48 / 64, 30 / 40), slice(10, 30), slice(16, 48)),  # wider than tall
        ((4 / 64, 0.0, 20 / 64, 1.0), slice(0, 40), slice(4, 20)),  # taller than wide, full height
    ],
)
def test_stage2_crop_takes_the_box_region_of_a_non_square_slice(tmp_path, box, rows, cols):
    rng = np.random.default_rng(4)
    pattern = rng.integers(0, 256, (40, 64), dtype=np.uint8)  # H = 40, W = 64
    _save_volume(tmp_path, "s", np.broadcast_to(pattern, (6, 40, 64)).copy())
    table = pd.DataFrame([{"StudyInstanceUID": "s", "vertebra": "C3", "start": 1, "end": 4}])
    table[BOX] = [box]
    ds = VertebraSequences(
        table, _dataset_cfg(tmp_path), train=False, image_size=16, in_chans=3, seq_len=3, aug=0.0
    )
    image = _u8(ds[0]["image"])
    assert image.shape == (3, 3, 16, 16)
    expected = cv2.resize(pattern[rows, cols], (16, 16), interpolation=cv2.INTER_LINEAR)
    for element in image:
        for channel in element:
            np.testing.assert_array_equal(channel, expected)


# ---- fault 5: the slices of a stage-2 sequence ----------------------------------------------------
@pytest.mark.parametrize(
    ("start", "end", "centres"),
    [(4, 12, [4, 6, 8, 10, 12]), (1, 5, [1, 2, 3, 4, 5]), (0, 8, [0, 2, 4, 6, 8])],
)
def test_stage2_sequence_spreads_its_slices_evenly_over_start_to_end(tmp_path, start, end, centres):
    _save_volume(tmp_path, "s", _z_volume(20, 24, 24))
    table = pd.DataFrame(
        [{"StudyInstanceUID": "s", "vertebra": "C5", "start": start, "end": end, "fractured": 1}]
    )
    table[BOX] = [(0.0, 0.0, 1.0, 1.0)]
    ds = VertebraSequences(
        table,
        _dataset_cfg(tmp_path),
        train=False,
        image_size=8,
        in_chans=3,
        seq_len=5,
        slice_step=2,
        aug=0.0,
    )
    sample = ds[0]
    image = _u8(sample["image"])  # (seq_len, in_chans, H, W)
    assert image.shape == (5, 3, 8, 8) and float(sample["target"]) == 1.0
    assert (image == image[..., :1, :1]).all()  # every crop is one constant slice
    slices = image[:, :, 0, 0] // 10
    assert slices[:, 1].tolist() == centres  # both ends included, evenly spaced
    assert slices[:, 0].tolist() == [max(c - 2, 0) for c in centres]
    assert slices[:, 2].tolist() == [min(c + 2, 19) for c in centres]


# ---- fault 6: the centre of the stage-1 2.5D stack ------------------------------------------------
@pytest.mark.parametrize(("in_chans", "step"), [(3, 1), (5, 2)])
def test_stage1_stack_centre_channel_is_the_labelled_slice(tmp_path, in_chans, step):
    n = 12
    _save_volume(tmp_path, "s", _z_volume(n, 16, 16))
    picks = [0, 1, 5, n - 2, n - 1]
    table = pd.DataFrame({"StudyInstanceUID": "s", "slice": picks})
    ratios = np.linspace(0.0, 1.0, len(picks) * 7).reshape(len(picks), 7)
    labelled = table.assign(**{v: ratios[:, j] for j, v in enumerate(VERT)}, vertebrae=1)
    labelled[BOX] = [(0.1, 0.2, 0.6, 0.9)] * len(picks)
    cfg = _dataset_cfg(tmp_path)
    for tab, train_mode in ((table, False), (labelled, True)):
        ds = VertebraSlices(
            tab, cfg, train=train_mode, image_size=16, in_chans=in_chans, slice_step=step, aug=0.0
        )
        for i, z in enumerate(picks):
            sample = ds[i]
            image = _u8(sample["image"])
            assert image.shape == (in_chans, 16, 16) and (image == image[:, :1, :1]).all()
            offsets = (np.arange(in_chans) - in_chans // 2) * step
            assert (image[:, 0, 0] // 10).tolist() == np.clip(z + offsets, 0, n - 1).tolist()
            assert float(sample["z"]) == pytest.approx(z / (n - 1))
            if train_mode:
                np.testing.assert_allclose(sample["ratios"].numpy(), ratios[i], rtol=1e-6)


def test_stage1_z_jitter_only_in_training_and_within_its_range(tmp_path):
    """z jitter is training augmentation: validation and inference must see the exact z."""
    n = 21
    _save_volume(tmp_path, "s", _z_volume(n, 16, 16))
    table = pd.DataFrame({"StudyInstanceUID": "s", "slice": np.arange(n)})
    table[VERT] = 0.0
    table[BOX] = [(0.1, 0.2, 0.6, 0.9)] * n
    table["vertebrae"] = 0
    exact = np.arange(n) / (n - 1)
    kwargs = dict(image_size=16, in_chans=3, aug=1.0, z_jitter=0.2)
    for train_mode in (False, True):
        ds = VertebraSlices(table, _dataset_cfg(tmp_path), train=train_mode, **kwargs)
        z = np.array([float(ds[i]["z"]) for i in range(n)])
        if not train_mode:
            np.testing.assert_allclose(z, exact, rtol=1e-6)
            continue
        assert np.abs(z - exact).max() > 0.02  # it does move
        assert (z >= 0.8 * exact - 0.1 - 1e-6).all() and (z <= 1.2 * exact + 0.1 + 1e-6).all()


# ---- fault 7: the losses against the metric they stand for ----------------------------------------
def test_stage1_ratio_weights_scale_each_vertebras_positive_term(tiny_cfg):
    """ratio_pos_weight multiplies the positive BCE term of its own vertebra (by position C1..C7)
    and nothing else; without it the loss is the plain soft-target BCE."""
    torch.manual_seed(0)
    out = {"ratio_logits": torch.randn(6, 7), "box": torch.rand(6, 4)}
    batch = {"ratios": torch.rand(6, 7), "box": torch.rand(6, 4), "vertebrae": torch.ones(6)}
    plain = build_loss(tiny_cfg("stage1_vertebra", "loss.params.box_weight=0"))
    weights = [4.0, 1, 1, 1, 1, 1, 2.0]
    weighted = build_loss(
        tiny_cfg(
            "stage1_vertebra", "loss.params.box_weight=0", f"loss.params.ratio_pos_weight={weights}"
        )
    )
    x, y = out["ratio_logits"], batch["ratios"]
    pos, neg = -y * torch.nn.functional.logsigmoid(x), -(1 - y) * torch.nn.functional.logsigmoid(-x)
    ratio_weight = tiny_cfg("stage1_vertebra").loss.params.ratio_weight
    expected_plain = ratio_weight * (pos + neg).mean()
    expected = ratio_weight * (torch.tensor(weights) * pos + neg).mean()
    torch.testing.assert_close(plain(out, batch), expected_plain)
    torch.testing.assert_close(weighted(out, batch), expected)


def test_competition_loss_equals_the_per_study_competition_metric(tiny_cfg):
    loss = build_loss(tiny_cfg("patient_head"))
    rng = np.random.default_rng(7)
    c = rng.integers(0, 2, (12, 7))
    c[:3] = 0  # some negative studies
    y = np.concatenate([c.max(axis=1, keepdims=True), c], axis=1).astype(np.float32)
    logits = rng.uniform(-3, 3, y.shape).astype(np.float32)
    value = float(loss({"logits": torch.from_numpy(logits)}, {"targets": torch.from_numpy(y)}))
    uids = [f"u{k}" for k in range(len(y))]
    prob = 1 / (1 + np.exp(-logits.astype(np.float64)))
    pred = pd.DataFrame(prob, columns=TARGETS).assign(StudyInstanceUID=uids)
    truth = pd.DataFrame(y.astype(int), columns=TARGETS).assign(StudyInstanceUID=uids)
    expected = score(pred, truth)
    assert value == pytest.approx(expected, rel=1e-5)
    unweighted = float(np.mean(-(y * np.log(prob) + (1 - y) * np.log1p(-prob))))
    assert abs(expected - unweighted) > 1e-2  # the weights matter on this batch


def test_stage2_loss_equals_the_metrics_vertebra_weighted_log_loss(tiny_cfg):
    loss = build_loss(tiny_cfg("stage2_fracture"))
    rng = np.random.default_rng(8)
    y = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0], np.float32)
    logit = rng.uniform(-3, 3, y.shape).astype(np.float32)
    logit[y == 1] -= 1.5  # positives predicted badly: their weight changes the value
    value = float(loss({"logit": torch.from_numpy(logit)}, {"target": torch.from_numpy(y)}))
    # The metric on a C1 column: sum_i w_i l_i / sum_i w_i with w = 2 (fractured) / 1.
    uids = [f"u{k}" for k in range(len(y))]
    prob = 1 / (1 + np.exp(-logit.astype(np.float64)))
    pred = pd.DataFrame(0.5, index=range(len(y)), columns=TARGETS).assign(StudyInstanceUID=uids)
    pred["C1"] = prob
    truth = pd.DataFrame(0, index=range(len(y)), columns=TARGETS).assign(StudyInstanceUID=uids)
    truth["C1"] = y.astype(int)
    expected = per_target_logloss(pred, truth)["C1"]
    assert value == pytest.approx(expected, rel=1e-5)
    unweighted = float(np.mean(-(y * np.log(prob) + (1 - y) * np.log1p(-prob))))
    assert abs(expected - unweighted) > 1e-2


# ---- fault 8: OOF folds and the CV report ---------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_data, tiny_output, tmp_path_factory):
    """All three stages trained (tiny) and predicted OOF in a private output folder."""
    out = tmp_path_factory.mktemp("dataflow_out")
    shutil.copytree(tiny_output / "rsna" / "prep", out / "rsna" / "prep")
    shutil.copy(tiny_output / "rsna" / "folds.csv", out / "rsna" / "folds.csv")
    # post.patient=head: these tests follow the head's output through the report (auto: below)
    ov = [*tiny_overrides(tiny_data, out), "localize.vert_thresh=0.001", "post.patient=head"]
    train.main(["--CFG", "config/rsna/stage1_vertebra.yaml", *ov])
    inference.main(["--CFG", "config/rsna/stage1_vertebra.yaml", "--split", "oof", *ov])
    stage2_labels_main(["--CFG", "config/rsna/stage2_fracture.yaml", *ov])
    for stage in ("stage2_fracture", "patient_head"):
        train.main(["--CFG", f"config/rsna/{stage}.yaml", *ov])
        inference.main(["--CFG", f"config/rsna/{stage}.yaml", "--split", "oof", *ov])
    return {
        stage: load_config(f"config/rsna/{stage}.yaml", ov)
        for stage in ("stage1_vertebra", "stage2_fracture", "patient_head")
    }


def _fold_models(cfg):
    run = run_config(cfg)
    models = load_models(run)
    assert sorted(models) == [0, 1]
    return run, models


def _folds(cfg) -> pd.DataFrame:
    return load_folds(paths.folds_csv(cfg), "StudyInstanceUID")


def _oof_and_folds(cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stage's OOF file and the fold file; every row carries its study's fold."""
    preds, folds = pd.read_csv(paths.preds_csv(cfg)), _folds(cfg)
    fold_of = preds.StudyInstanceUID.map(folds.set_index("StudyInstanceUID").fold)
    assert (preds.fold == fold_of).all()
    return preds, folds


def _stage1(run, model, uids) -> pd.DataFrame:
    studies = pd.read_csv(layout.studies_csv(paths.prep_dir(run)), dtype=str)
    studies = studies[studies.StudyInstanceUID.isin(uids)].astype({"n_slices": int})
    return predict_frame(run, [model], slice_table(studies))


def _assert_own_fold_reproduces(stored, redo, other, keys, cols):
    merged = stored.merge(redo, on=keys, suffixes=("", "_own"), validate="1:1")
    assert len(merged) == len(stored) > 0
    for col in cols:
        np.testing.assert_allclose(merged[col], merged[f"{col}_own"], rtol=1e-5, atol=1e-6)
    merged = stored.merge(other, on=keys, suffixes=("", "_other"), validate="1:1")
    gap = max(np.abs(merged[c] - merged[f"{c}_other"]).max() for c in cols)
    assert gap > 1e-4  # the other fold's model really predicts something else


def test_stage1_oof_rows_are_predicted_by_their_own_fold_model(runs):
    cfg = runs["stage1_vertebra"]
    preds, folds = _oof_and_folds(cfg)
    run, models = _fold_models(cfg)
    for k in (0, 1):
        uids = folds.loc[folds.fold == k, "StudyInstanceUID"].tolist()
        stored = preds[preds.fold == k].drop(columns="fold")
        own = _stage1(run, models[k], uids)
        other = _stage1(run, models[1 - k], uids)
        _assert_own_fold_reproduces(
            stored, own, other, ["StudyInstanceUID", "slice"], [*BOX, *VERT]
        )


def test_stage2_oof_rows_are_predicted_by_their_own_fold_model(runs):
    cfg = runs["stage2_fracture"]
    preds, folds = _oof_and_folds(cfg)
    table = pd.read_csv(layout.stage2_labels_csv(cfg, "oof"))
    assert len(preds) == len(table)
    run, models = _fold_models(cfg)
    for k in (0, 1):
        part = table[table.StudyInstanceUID.isin(folds.loc[folds.fold == k, "StudyInstanceUID"])]
        stored = preds.loc[preds.fold == k, ["StudyInstanceUID", "vertebra", "logit"]]
        own = predict_frame(run, [models[k]], part)[["StudyInstanceUID", "vertebra", "logit"]]
        other = predict_frame(run, [models[1 - k]], part)[["StudyInstanceUID", "vertebra", "logit"]]
        _assert_own_fold_reproduces(stored, own, other, ["StudyInstanceUID", "vertebra"], ["logit"])


def test_cv_report_head_predictions_come_from_each_studys_own_fold_model(runs):
    cfg = runs["patient_head"]
    oof = pd.read_csv(paths.preds_csv(cfg))  # the head's raw OOF predictions
    folds = _folds(cfg)
    assert sorted(oof.StudyInstanceUID) == sorted(folds.StudyInstanceUID)
    stage2 = pd.read_csv(paths.preds_csv(cfg, cfg.stages.fracture))
    priors = train_priors(cfg)
    run, models = _fold_models(cfg)
    for k in (0, 1):
        uids = folds.loc[folds.fold == k, "StudyInstanceUID"].tolist()
        stored = oof[oof.StudyInstanceUID.isin(uids)]
        table = study_logit_table(stage2, priors, uids)
        own = predict_frame(run, [models[k]], table)
        other = predict_frame(run, [models[1 - k]], table)
        _assert_own_fold_reproduces(stored, own, other, ["StudyInstanceUID"], TARGETS)


def test_cv_report_metric_rescored_from_its_own_oof_file(runs, tiny_data):
    cfg = runs["patient_head"]
    report = json.loads(paths.cv_report(cfg, "json").read_text())
    oof = pd.read_csv(layout.oof_csv(cfg))
    train_csv = pd.read_csv(tiny_data / "train.csv")
    truth = train_csv[train_csv.StudyInstanceUID.isin(_folds(cfg).StudyInstanceUID)]
    assert report["model"] == "stage 2 + patient head" and report["n_studies"] == len(truth)
    assert report["oof_metric"] == pytest.approx(score(oof, truth), rel=1e-9)
    assert report["oof_metric_global"] == pytest.approx(
        score(oof, truth, per_study=False), rel=1e-9
    )
    prior = (train_csv[TARGET_ORDER].sum() + 1) / (len(train_csv) + 2)  # add-one smoothed
    constant = truth[["StudyInstanceUID"]].assign(**{t: prior[t] for t in TARGET_ORDER})
    assert report["baseline_prior"] == pytest.approx(score(constant, truth), rel=1e-9)


def test_cv_report_oof_file_is_the_calibrated_and_checked_head_output(runs):
    """oof_predictions.csv = the head's OOF, calibrated by the other folds' fit, then shrunk where
    the OOF localisation is implausible; calibration.json = the fit on every study."""
    cfg = runs["patient_head"]
    raw = pd.read_csv(paths.preds_csv(cfg), dtype={"StudyInstanceUID": str})
    final = pd.read_csv(layout.oof_csv(cfg), dtype={"StudyInstanceUID": str})
    truth = pd.read_csv(layout.labels_csv(cfg.data_dir), dtype={"StudyInstanceUID": str})
    uids = final.StudyInstanceUID.tolist()
    raw = raw.set_index("StudyInstanceUID").loc[uids, TARGETS].reset_index()
    truth = truth.set_index("StudyInstanceUID").loc[uids].reset_index()
    fold = _folds(cfg).set_index("StudyInstanceUID").loc[uids, "fold"].to_numpy()
    calibrated = crossfit_platt(raw, truth, fold)
    loc = pd.read_csv(layout.stage2_labels_csv(cfg, "oof"), dtype={"StudyInstanceUID": str})
    post = cfg.post
    ref = reference(loc)
    saved_ref = json.loads(layout.plausibility_json(cfg).read_text())
    assert saved_ref.keys() == ref.keys() == set(VERT)
    for v in VERT:
        assert saved_ref[v] == pytest.approx(ref[v], nan_ok=True), v
    flags = implausible(loc, uids, post.min_peak, tuple(post.length_range), ref)
    expected = shrink(calibrated, flags, train_priors(cfg), post.shrink)
    np.testing.assert_allclose(final[TARGETS], expected[TARGETS], rtol=1e-9)
    assert not np.allclose(final[TARGETS], raw[TARGETS])  # calibration did something
    saved = json.loads(layout.calibration_json(cfg).read_text())
    fit = fit_platt(raw, truth)
    assert saved.keys() == fit.keys()
    for t in TARGETS:
        assert saved[t] == pytest.approx(fit[t]), t


def test_auto_patient_level_is_the_one_of_lower_oof_metric_and_the_chain_reads_it(runs):
    """post.patient=auto: the CV report scores the head and noisy-OR the same way (cross-fitted
    calibration, shrink), keeps the lower, and saves it and its calibration for the chain."""
    cfg = runs["patient_head"].replace(**{"post.patient": "auto"})
    report = cv_report(cfg)
    scores = report["patient_level"]["oof_metric"]
    assert set(scores) == {"head", "noisy_or"}
    chosen = min(scores, key=scores.get)
    assert report["patient_level"]["chosen"] == chosen
    assert report["oof_metric"] == pytest.approx(scores[chosen], rel=1e-12)
    saved = json.loads(layout.patient_level_json(cfg).read_text())
    assert saved["patient_level"] == chosen
    stage2 = pd.read_csv(paths.preds_csv(cfg, cfg.stages.fracture), dtype={"StudyInstanceUID": str})
    truth = pd.read_csv(layout.labels_csv(cfg.data_dir), dtype={"StudyInstanceUID": str})
    uids = sorted(_folds(cfg).StudyInstanceUID)
    truth = truth.set_index("StudyInstanceUID").loc[uids].reset_index()
    raw = (
        {
            "head": pd.read_csv(paths.preds_csv(cfg), dtype={"StudyInstanceUID": str}),
            "noisy_or": stage2_wide(stage2, uids, train_priors(cfg), "noisy_or"),
        }[chosen]
        .set_index("StudyInstanceUID")
        .loc[uids, TARGETS]
        .reset_index()
    )
    fit = fit_platt(raw, truth)
    calibration = json.loads(layout.calibration_json(cfg).read_text())
    for t in TARGETS:
        assert calibration[t] == pytest.approx(fit[t]), t
    # The stage-2 pass reports before the head exists: a named level falls back to what there is.
    assert choose_patient_level("head", {"noisy_or": 0.3}) == "noisy_or"


def test_a_stage_takes_the_callers_runtime_keys_and_an_upstream_stage_keeps_its_own(runs):
    """inference.py's own stage applies a command-line post/report override; upstream stages do not."""
    head = runs["patient_head"].replace(**{"post.shrink": 0.9, "post.patient": "noisy_or"})
    own = run_config(head)
    assert (own.post.shrink, own.post.patient) == (0.9, "noisy_or")
    upstream = run_config(head, head.stages.fracture)
    assert upstream.post.shrink == runs["stage2_fracture"].post.shrink != 0.9
    assert upstream.output_dir == head.output_dir  # call keys reach every stage
