"""The synthetic RSNA 2022 generator: Kaggle layout, label rates, odd cases, visible fractures."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from utils.errors import InputError
from utils.rsna.dicom import Study, load_study
from utils.rsna.nifti import load_rsna_seg
from utils.rsna.synthetic.generator import (
    FRACTURED_COUNT,
    PRESETS,
    SPINOUS,
    STYLES,
    VERTEBRAE,
    assign_labels,
    context_bone,
    generate,
    make_geometry,
    make_grid,
    plan_dataset,
    render_slice,
    study_style,
)
from utils.rsna.synthetic.writers import TRANSFER_SYNTAXES

ROOT = Path(__file__).resolve().parents[2]
LABEL_COLS = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
SOFT_TISSUE_MAX = 135.0  # HU between soft tissue (<= 50 + noise) and cancellous bone (>= 220)
SYNTAX_NAMES = {str(uid): name for name, uid in TRANSFER_SYNTAXES.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    return out, generate(out, preset="tiny", seed=0)


@pytest.fixture(scope="module")
def studies(tiny) -> dict[str, Study]:
    """Every study of the tiny dataset, read with the pipeline's reader."""
    root, _ = tiny
    return {
        p.name: load_study(p)
        for split in ("train", "test")
        for p in sorted((root / f"{split}_images").iterdir())
    }


@pytest.fixture(scope="module")
def segmented(tiny, studies) -> dict[str, np.ndarray]:
    """uid -> (Z, H, W) labels of every segmented study, checked against its slice count."""
    root, _ = tiny
    return {
        p.stem: load_rsna_seg(p, n_slices=studies[p.stem].n_slices, study=p.stem)
        for p in sorted((root / "segmentations").glob("*.nii"))
    }


def _csv(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name)


def test_layout_and_csv_schemas(tiny):
    root, summary = tiny
    assert sorted(p.name for p in root.iterdir()) == [
        "sample_submission.csv",
        "segmentations",
        "test.csv",
        "test_images",
        "test_labels.csv",
        "train.csv",
        "train_bounding_boxes.csv",
        "train_images",
    ]
    train, test_labels = _csv(root, "train.csv"), _csv(root, "test_labels.csv")
    for labels, split in ((train, "train"), (test_labels, "test")):
        assert list(labels.columns) == LABEL_COLS
        assert labels[LABEL_COLS[1:]].dtypes.map(pd.api.types.is_integer_dtype).all()
        assert labels[LABEL_COLS[1:]].isin([0, 1]).all().all()
        assert (labels["patient_overall"] == labels[VERTEBRAE].max(axis=1)).all()
        assert labels["StudyInstanceUID"].str.fullmatch(r"1\.2\.826\.0\.1\.3680043\.\d+").all()
        folders = sorted(p.name for p in (root / f"{split}_images").iterdir())
        assert folders == sorted(labels["StudyInstanceUID"])
    assert len(train) == summary["train_studies"] == PRESETS["tiny"].n_train
    assert train["patient_overall"].sum() == summary["train_positives"]
    assert 0 < summary["train_positives"] < len(train)
    assert not set(train["StudyInstanceUID"]) & set(test_labels["StudyInstanceUID"])
    segs = {p.stem for p in (root / "segmentations").iterdir()}
    assert all(p.suffix == ".nii" for p in (root / "segmentations").iterdir())
    assert len(segs) == summary["segmented"] >= 3 and segs <= set(train["StudyInstanceUID"])

    boxes = _csv(root, "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert all(boxes[c].dtype == np.float64 for c in ("x", "y", "width", "height"))
    assert pd.api.types.is_integer_dtype(boxes["slice_number"])
    box_uids = set(boxes["StudyInstanceUID"])
    assert len(box_uids) == summary["box_studies"] >= 1 and len(boxes) == summary["box_rows"]
    assert box_uids <= set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])


def test_test_csv_and_sample_submission(tiny):
    root, summary = tiny
    test, sample = _csv(root, "test.csv"), _csv(root, "sample_submission.csv")
    uids = _csv(root, "test_labels.csv")["StudyInstanceUID"]
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert len(test) == 8 * len(uids) == 8 * summary["test_studies"]
    assert (test["row_id"] == test["StudyInstanceUID"] + "_" + test["prediction_type"]).all()
    for uid, group in test.groupby("StudyInstanceUID"):
        assert uid in set(uids)
        assert sorted(group["prediction_type"]) == sorted([*VERTEBRAE, "patient_overall"])
    assert list(sample.columns) == ["row_id", "fractured"]
    assert sample["row_id"].tolist() == test["row_id"].tolist()
    assert (sample["fractured"] == 0.5).all()


def test_deterministic_refuses_non_empty_and_seed_changes_data(tiny, tmp_path):
    root, _ = tiny
    again = tmp_path / "again"
    generate(again, preset="tiny", seed=0, workers=2)  # worker count must not matter
    for name in (
        "train.csv",
        "train_bounding_boxes.csv",
        "test.csv",
        "sample_submission.csv",
        "test_labels.csv",
    ):
        assert (again / name).read_bytes() == (root / name).read_bytes(), name
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    sampled = [f for f in files if f.suffix == ".nii"] + [f for f in files if f.suffix == ".dcm"][
        ::37
    ]
    for f in sampled:
        assert (again / f).read_bytes() == (root / f).read_bytes(), f

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not a dataset")
    with pytest.raises(InputError, match="not empty"):
        generate(other, preset="tiny", seed=1)
    assert (other / "keep.txt").exists()
    generate(other, preset="tiny", seed=1, overwrite=True)
    assert not (other / "keep.txt").exists()
    assert (other / "train.csv").read_bytes() != (root / "train.csv").read_bytes()
    assert not list(tmp_path.glob(".*"))  # no partial or old folders left behind


def test_every_study_loads_with_the_planned_odd_cases(tiny, studies):
    root, summary = tiny
    assert len(studies) == summary["train_studies"] + summary["test_studies"]
    syntaxes: dict[str, int] = {}
    for uid, study in studies.items():
        numbers = np.sort(study.file_numbers)
        assert study.n_files == study.n_slices and not study.skipped and not study.n_duplicates
        assert np.array_equal(numbers, np.arange(numbers[0], numbers[0] + study.n_slices)), uid
        assert 32 <= study.n_slices <= 48 and study.rows == 64
        assert np.all(np.diff(study.positions) > 0)
        assert study.hu.min() < -900 and study.hu.max() > 700  # air and cortical bone
        (name,) = [SYNTAX_NAMES[ts] for ts in study.transfer_syntaxes]
        syntaxes[name] = syntaxes.get(name, 0) + 1
    assert syntaxes == summary["syntaxes"]
    assert {"explicit", "jpeg_lossless", "rle"} <= set(syntaxes)
    assert sum(s.reversed for s in studies.values()) == summary["reversed"] >= 1
    assert sum(s.file_numbers.min() == 2 for s in studies.values()) == summary["start_at_2"] >= 1
    assert sum(s.cols != s.rows for s in studies.values()) == summary["non_square"] >= 1
    # Normal studies descend in patient z with the file number (head = larger z in LPS).
    uid = next(u for u, s in studies.items() if not s.reversed)
    first, last = (pydicom.dcmread(p, stop_before_pixels=True) for p in _ends(root, uid))
    assert float(first.ImagePositionPatient[2]) > float(last.ImagePositionPatient[2])
    signed = sum(
        pydicom.dcmread(_ends(root, u)[0], stop_before_pixels=True).PixelRepresentation == 1
        for u in studies
    )
    assert signed == summary["signed"] >= 1


def _ends(root: Path, uid: str) -> tuple[Path, Path]:
    """Lowest- and highest-numbered files of a study."""
    folder = next(
        p for split in ("train", "test") if (p := root / f"{split}_images" / uid).is_dir()
    )
    files = sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))
    return files[0], files[-1]


def test_segmentations_match_the_bone(studies, segmented):
    assert any(studies[uid].reversed for uid in segmented)
    for uid, seg in segmented.items():
        hu = studies[uid].hu
        assert seg.shape == hu.shape
        assert set(range(1, 8)) <= set(np.unique(seg).tolist())
        depth = np.arange(seg.shape[0])
        c1, c7 = (np.average(depth, weights=(seg == v).sum(axis=(1, 2))) for v in (1, 7))
        assert c1 < c7
        cervical = (seg >= 1) & (seg <= 7)
        assert (hu[cervical] > SOFT_TISSUE_MAX).mean() > 0.9  # labels sit on bone (cracks aside)
        assert np.median(hu[cervical]) > 200
        around = _context_masks(uid)  # skull base, mandible, clavicles, ribs: unlabelled
        assert around.any() and (seg[around] == 0).mean() > 0.95
        assert (seg[(hu > 600) & ~around] > 0).all()  # all cortical bone of the spine is labelled
        assert np.median(hu[seg == 0]) < 100


def _context_masks(uid: str) -> np.ndarray:
    """(Z, H, W) bone around the spine of a tiny train study, head -> feet, from its geometry."""
    (spec,) = [s for s in plan_dataset(PRESETS["tiny"], seed=0) if s.uid == uid]
    geom = make_geometry(spec, PRESETS["tiny"], seed=0)
    grid = make_grid(geom)
    depths = (np.arange(geom.n_slices) + 0.5) * geom.dz
    return np.stack([context_bone(geom, grid.u, grid.v, float(d)) for d in depths])


def test_levels_differ_by_the_anatomy_around_them_not_by_their_place_in_the_stack():
    demo = PRESETS["demo"]
    geoms = [make_geometry(s, demo, seed=0) for s in plan_dataset(demo, 0)[:40]]
    # Where C1 and C7 sit in the stack varies: most scans start in the skull base, some at C1.
    c1 = np.array([g.levels[0].top / g.coverage for g in geoms])
    heads = np.array([g.context.head for g in geoms])
    assert 0.2 < (heads == 0).mean() < 0.5 and c1.max() - c1.min() > 0.1
    assert SPINOUS[7] > max(SPINOUS[k] for k in range(3, 7))  # C7, the vertebra prominens
    checked = {"skull": 0, "thorax": 0}
    for g in geoms[:6]:
        grid = make_grid(g)
        skull = g.levels[0].top - g.context.head / 2  # mid skull base (or C1's top)
        clavicle, lungs = g.context.clavicle, g.context.lung_top + 20.0
        if g.context.head:
            # Skull slices hold bone but no vertebra label.
            above = render_slice(g, grid, int(skull / g.dz))
            assert (above.hu >= g.cortical).any() and not above.labels.any()
            checked["skull"] += 1
        if clavicle < g.coverage - g.dz and lungs < g.coverage - g.dz:
            low = render_slice(g, grid, int(lungs / g.dz))
            assert (low.hu < -800).sum() > 20  # the lung apices beside the airway
            bone = context_bone(g, grid.u, grid.v, clavicle)  # clavicles (and ribs, which
            labels = render_slice(g, grid, int(clavicle / g.dz)).labels  # touch the vertebrae)
            assert bone.sum() > 20 and (labels[bone] == 0).mean() > 0.9
            checked["thorax"] += 1
    assert min(checked.values()) >= 2, checked  # both checks ran on several studies


def test_fractures_are_visible_inside_fractured_vertebrae(tiny, segmented, studies):
    root, _ = tiny
    train = _csv(root, "train.csv").set_index("StudyInstanceUID")
    fractured, intact = [], []
    for uid, seg in segmented.items():
        hu = studies[uid].hu
        for v, name in enumerate(VERTEBRAE, start=1):
            values = hu[seg == v]
            (fractured if train.loc[uid, name] else intact).append(
                (v, (values < SOFT_TISSUE_MAX).mean(), values)
            )
    assert fractured and intact
    for v, dark, values in fractured:
        # A crack is a soft-tissue band through bone: clearly darker than the bone around it.
        assert dark > 0.05, f"C{v}: only {dark:.3f} of its voxels are soft tissue"
        assert np.median(values[values < SOFT_TISSUE_MAX]) < 100
        assert np.median(values) > 200
        same = [d for w, d, _ in intact if w == v]
        assert same and max(same) == 0.0, f"intact C{v} elsewhere has soft-tissue voxels"
    assert max(d for _, d, _ in intact) == 0.0


def test_fracture_boxes_point_at_cracks(tiny, studies):
    root, _ = tiny
    boxes = _csv(root, "train_bounding_boxes.csv")
    for uid, group in boxes.groupby("StudyInstanceUID"):
        study = studies[uid]
        index = {int(n): k for k, n in enumerate(study.file_numbers)}
        assert all(
            (root / "train_images" / uid / f"{n}.dcm").is_file() for n in group["slice_number"]
        )
        for row in group.itertuples():
            assert 0 <= row.x <= study.cols - row.width and 0 <= row.y <= study.rows - row.height
            assert row.width >= 1 and row.height >= 1
            x, y = int(row.x), int(row.y)
            patch = study.hu[
                index[row.slice_number], y : y + int(row.height), x : x + int(row.width)
            ]
            assert (patch < SOFT_TISSUE_MAX).any() and (patch > 600).any()


def test_label_assignment_follows_real_rates():
    rng = np.random.default_rng(0)
    full = assign_labels(2019, rng)
    assert full.any(axis=1).sum() == 961
    per_study = full.sum(axis=1)
    assert {k: int((per_study == k).sum()) for k in FRACTURED_COUNT} == FRACTURED_COUNT
    # Per-vertebra quotas: within a few studies of the real counts (C1..C7).
    assert np.abs(full.sum(axis=0) - [146, 285, 73, 108, 162, 277, 393]).max() <= 5
    demo = assign_labels(90, rng)
    assert demo.any(axis=1).sum() == 43
    assert np.argmax(demo.sum(axis=0)) == 6  # C7 most often fractured
    assert assign_labels(2, rng).any(axis=1).sum() == 1
    assert not assign_labels(1, rng).any()


def test_demo_bench_and_check_plans():
    demo = plan_dataset(PRESETS["demo"], seed=0)
    train = [s for s in demo if s.split == "train"]
    assert len(train) == 90 and len(demo) == 93
    assert 25 <= sum(s.segmented for s in train) <= 35
    assert any(s.segmented and s.reversed for s in train)
    assert 6 <= sum(s.reversed for s in demo) <= 12
    assert {"explicit", "jpeg_lossless", "rle"} == {s.syntax for s in demo}
    segmented_labels = [any(s.labels) for s in train if s.segmented]
    assert any(segmented_labels) and not all(segmented_labels)
    geom = make_geometry(train[0], PRESETS["demo"], seed=0)
    assert geom.rows == 256 and 80 <= geom.n_slices <= 110 and 1.4 <= geom.dz <= 2.8

    (bench,) = plan_dataset(PRESETS["bench"], seed=0)
    assert (bench.split, bench.syntax, bench.first_number, bench.reversed) == (
        "train",
        "jpeg_lossless",
        1,
        False,
    )
    geom = make_geometry(bench, PRESETS["bench"], seed=0)
    assert (geom.n_slices, geom.rows, geom.cols) == (300, 512, 512)

    # bench/check_full.py: real-size studies, all train ones segmented, the quirks included.
    check = plan_dataset(PRESETS["check"], seed=0)
    assert [s.split for s in check] == ["train"] * 3 + ["test"]
    assert all(s.segmented for s in check[:3]) and any(s.reversed for s in check)
    geoms = [make_geometry(s, PRESETS["check"], seed=0) for s in check]
    assert all(g.rows == 512 and 280 <= g.n_slices <= 320 for g in geoms)
    assert sorted({g.cols for g in geoms}) == [512, 519]


def test_cli_runs_by_path():
    result = subprocess.run(
        [sys.executable, "-m", "utils.rsna.synthetic", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--preset" in result.stdout and "--overwrite" in result.stdout


def test_styles_are_drawn_per_study_by_weight_and_unseen_is_outside_the_demo():
    mixed = replace(PRESETS["demo"], styles=("classic", "subtle", "lean"), style_weights=None)
    styles = [study_style(s, mixed, 0) for s in plan_dataset(mixed, seed=0)]
    assert min(styles.count(name) for name in mixed.styles) > 20
    demo = PRESETS["demo"]
    drawn = [study_style(s, demo, 0) for s in plan_dataset(demo, 0) if s.split == "train"]
    assert set(drawn) == set(demo.styles) == {"classic", "subtle", "lean"}
    assert drawn.count("classic") > max(drawn.count("subtle"), drawn.count("lean"))  # weights
    assert PRESETS["unseen"].styles == ("unseen",)
    for name in mixed.styles:  # the unseen style lies outside these training ranges
        train, unseen = STYLES[name], STYLES["unseen"]
        assert unseen.noise[0] > train.noise[1] - 5 and unseen.crack_slope[0] > train.crack_slope[0]


def test_subtle_cracks_keep_part_of_the_bone_and_unseen_studies_are_blurred():
    demo = PRESETS["demo"]
    demo = replace(demo, styles=("subtle",))
    subtle = [make_geometry(s, demo, seed=0) for s in plan_dataset(demo, 0) if any(s.labels)]
    cracks = [c for geom in subtle for level in geom.levels for c in level.cracks]
    assert cracks and all(0.25 <= c.contrast <= 0.8 for c in cracks)
    geom, level = next(
        (g, lv)
        for g in subtle
        for lv in g.levels
        if len(lv.cracks) == 1 and lv.label > 1 and np.isfinite(lv.cracks[0].depths[0])
    )
    (crack,) = level.cracks
    mid = (level.top + level.bottom) / 2
    grid = make_grid(geom)

    def at(depth: float):  # the slice through ``depth`` mm below the top slice
        return render_slice(geom, grid, 0, offset=depth - 0.5 * geom.dz)

    centre = mid + sum(crack.depths) / 2
    keep = np.float32(geom.soft + (1 - crack.contrast) * (geom.cancellous - geom.soft))
    assert (at(centre).hu == keep).sum() > 3  # the crack's partial volume
    outside = [mid + crack.depths[1] + 0.5, mid + crack.depths[0] - 0.5]
    inside = [d for d in outside if level.top + 1.5 < d < level.bottom - 1.5]
    assert inside
    for depth in inside:  # a crack spanning part of the vertebra is absent beyond it
        assert not (at(depth).hu == keep).any()

    unseen = PRESETS["unseen"]
    spec = plan_dataset(unseen, 0)[0]
    geom = make_geometry(spec, unseen, seed=0)
    assert spec.split == "test" and geom.z_samples == 3 and 0.8 <= geom.blur <= 1.5


def test_unseen_preset_is_a_test_only_folder(tmp_path):
    out = tmp_path / "unseen"
    summary = generate(out, preset="unseen", seed=0, workers=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_submission.csv", "test.csv", "test_images", "test_labels.csv",
    ]  # fmt: skip
    assert summary["test_studies"] == 24 and 0 < summary["test_positives"] < 24
    labels = pd.read_csv(out / "test_labels.csv")
    assert list(labels.columns) == LABEL_COLS and len(labels) == 24
