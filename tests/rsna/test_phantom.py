"""The evaluation phantom (utils/rsna/synthetic/phantom.py): competition layout, what the repo's reader makes
of it, label consistency, determinism and independence from the training generator."""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from tests.conftest import ROOT
from utils.errors import InputError
from utils.rsna.dicom import load_study
from utils.rsna.synthetic import phantom

SIZE = 64  # pixels a side: the anatomy and field of view stay those of 512, only coarser
N_TEST, N_TRAIN, SEED = 8, 2, 11
UID = "StudyInstanceUID"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """8 test + 2 train studies at 64 px, written through the command line."""
    out = tmp_path_factory.mktemp("phantom") / "set"
    phantom.main(
        [
            "--out",
            str(out),
            "--studies",
            str(N_TEST),
            "--seed",
            str(SEED),
            "--size",
            str(SIZE),
            "--train-studies",
            str(N_TRAIN),
            "--workers",
            "1",
        ]
    )
    return out


@pytest.fixture(scope="module")
def plans() -> list[phantom.StudyPlan]:
    return phantom.plan_dataset(N_TEST, N_TRAIN, SEED, SIZE)


@pytest.fixture(scope="module")
def studies(dataset) -> pd.DataFrame:
    return pd.read_csv(dataset / "phantom_studies.csv", dtype={UID: str})


def test_competition_layout_and_schemas(dataset, plans):
    test = pd.read_csv(dataset / "test.csv", dtype={UID: str})
    answers = pd.read_csv(dataset / "test_labels.csv", dtype={UID: str})
    train = pd.read_csv(dataset / "train.csv", dtype={UID: str})
    boxes = pd.read_csv(dataset / "train_bounding_boxes.csv", dtype={UID: str})
    sample = pd.read_csv(dataset / "sample_submission.csv")
    test_uids = [p.uid for p in plans if p.split == "test"]
    train_uids = [p.uid for p in plans if p.split == "train"]

    assert list(test.columns) == ["row_id", UID, "prediction_type"]
    assert len(test) == 8 * N_TEST
    assert (test.row_id == test[UID] + "_" + test.prediction_type).all()
    assert set(test.prediction_type) == {"patient_overall", *phantom.VERTEBRAE}
    assert list(sample.columns) == ["row_id", "fractured"] and sample.row_id.equals(test.row_id)
    for labels, uids in ((answers, test_uids), (train, train_uids)):
        assert list(labels.columns) == [UID, "patient_overall", *phantom.VERTEBRAE]
        assert labels[UID].tolist() == uids
        assert labels.drop(columns=UID).isin([0, 1]).all().all()
    assert list(boxes.columns) == [UID, "x", "y", "width", "height", "slice_number"]
    for row in boxes.itertuples():
        assert (
            dataset / "train_images" / row.StudyInstanceUID / f"{row.slice_number}.dcm"
        ).is_file()
    for split, uids in (("test", test_uids), ("train", train_uids)):
        folder = dataset / f"{split}_images"
        assert sorted(p.name for p in folder.iterdir()) == sorted(uids)
        for plan in (p for p in plans if p.split == split):
            names = sorted(int(f.stem) for f in (folder / plan.uid).glob("*.dcm"))
            assert names == list(range(1, plan.acquisition.n_slices + 1))


def test_repo_reader_reads_every_study_head_to_feet(dataset, plans):
    """Slice order, count and HU exactly as drawn: slice 0 of the reader is the head end."""
    for plan in plans:
        study = load_study(dataset / f"{plan.split}_images" / plan.uid)
        assert study.n_slices == plan.acquisition.n_slices
        assert study.skipped == () and study.n_duplicates == 0
        np.testing.assert_array_equal(study.file_numbers, plan.numbers)
        intercept = phantom.ENCODINGS[plan.encoding][2]
        for k in (0, plan.acquisition.n_slices // 2, plan.acquisition.n_slices - 1):
            hu, _ = phantom.render(plan, k)
            drawn = phantom.stored_values(plan, hu).astype(np.float32) + np.float32(intercept)
            np.testing.assert_array_equal(study.hu[k], drawn)


def test_storage_varies_as_real_studies_do(dataset, studies):
    syntaxes = {
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for f in dataset.glob("*_images/*/1.dcm")
    }
    assert len(syntaxes) >= 2
    assert set(studies.numbering) >= {
        "head_first",
        "feet_first",
        "reversed_numbers",
        "shuffled_numbers",
    }
    assert (studies.tilt_deg != 0).any()
    assert studies.encoding.nunique() >= 2


def test_slice_header_tags(dataset, plans):
    plan = next(p for p in plans if p.orientation == "FFS")
    ds = pydicom.dcmread(dataset / f"{plan.split}_images" / plan.uid / "1.dcm")
    assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.StudyInstanceUID == plan.uid
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SeriesInstanceUID and ds.InstanceNumber == 1
    assert [float(v) for v in ds.ImageOrientationPatient][:3] == [-1.0, 0.0, 0.0]
    assert (ds.Rows, ds.Columns) == (SIZE, SIZE) and ds.BitsAllocated == 16
    assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation in (0, 1)
    assert float(ds.PixelSpacing[0]) > 0 and float(ds.SliceThickness) > 0
    assert ds.RescaleSlope == 1 and ds.RescaleIntercept in (0, -1024)


def test_labels_are_consistent_with_the_field_of_view(dataset, studies):
    answers = pd.read_csv(dataset / "test_labels.csv", dtype={UID: str})
    train = pd.read_csv(dataset / "train.csv", dtype={UID: str})
    labels = pd.concat([train, answers]).merge(studies, on=UID)
    vertebrae = list(phantom.VERTEBRAE)
    assert (labels.patient_overall == labels[vertebrae].max(axis=1)).all()
    for v in vertebrae:
        assert (labels.loc[labels[f"{v}_fov"] != "whole", v] == 0).all(), v
    assert (studies.C1_fov != "whole").any() and (studies.C7_fov != "whole").any()
    assert answers.patient_overall.sum() == round(N_TEST * phantom.POSITIVE_SHARE)


def test_prevalences_follow_the_competition():
    """Plans only (no rendering): ~half the patients fractured, C7 and C2 the most often."""
    plans = phantom.plan_dataset(300, 0, 3, 32)
    labels = np.array([[p.labels[v] for v in phantom.VERTEBRAE] for p in plans])
    assert labels.max(axis=1).mean() == pytest.approx(phantom.POSITIVE_SHARE, abs=0.01)
    rates = labels.mean(axis=0)
    assert set(np.argsort(rates)[-2:]) == {1, 6}  # C2, C7
    for p in plans:
        for v in phantom.VERTEBRAE:
            assert p.visibility[v] == "whole" or p.labels[v] == 0


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_deterministic_for_a_seed(tmp_path):
    first = phantom.generate(tmp_path / "a", studies=2, seed=5, size=32, workers=1)
    second = phantom.generate(tmp_path / "b", studies=2, seed=5, size=32, workers=2)
    other = phantom.generate(tmp_path / "c", studies=2, seed=6, size=32, workers=1)
    assert first.equals(second)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert not other[UID].isin(first[UID]).any()
    with pytest.raises(InputError, match="not empty"):
        phantom.generate(tmp_path / "a", studies=1, seed=5, size=32)


def test_shares_no_code_with_the_training_generator():
    source = Path(phantom.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert not {m for m in imported if m.startswith("utils.rsna")}
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, utils.rsna.synthetic.phantom; print(sorted(m for m in sys.modules "
            "if m.startswith('utils.rsna')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for other in ("generator", "writers"):  # the training generator and its DICOM writer
        assert f"utils.rsna.synthetic.{other}" not in loaded
    assert "utils.rsna.dicom" not in loaded
