"""The Kaggle submission: path discovery, the code bundle, and the notebook itself executed offline.

The notebook (kaggle/rsna_submission.ipynb) runs with nbclient against fake ``KAGGLE_ROOT``
trees: attached code bundle (built from the tiny trained runs of conftest.py), a wheels folder
whose requirements are already installed (pip runs offline and changes nothing), and the
competition under either mount style.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pydicom
import pytest
from nbclient import NotebookClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

import inference
from utils.checkpoint import load_checkpoint
from utils.errors import InputError
from utils.rsna import kaggle, kaggle_bundle, layout
from utils.rsna.kaggle import SLUG, find_competition
from utils.rsna.metric import TARGETS, validate_submission
from utils.rsna.submit import chain_products

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "kaggle" / kaggle_bundle.NOTEBOOK


# ---- path discovery -----------------------------------------------------------------------------
def _competition(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "test.csv").write_text("row_id,StudyInstanceUID,prediction_type\n")
    (folder / "sample_submission.csv").write_text("row_id,fractured\n")
    return folder


def test_competition_folder_is_found_under_either_mount_style(tmp_path, monkeypatch):
    old = _competition(tmp_path / "a" / "input" / SLUG)
    (tmp_path / "a" / "input" / "some-weights" / "fold0").mkdir(parents=True)
    assert find_competition(tmp_path / "a") == old
    new = _competition(tmp_path / "b" / "input" / "competitions" / SLUG)
    assert find_competition(tmp_path / "b") == new
    # Only the glob matters: a renamed mount is still found when it is the only one.
    renamed = _competition(tmp_path / "c" / "input" / "datasets" / "someone" / "rsna-copy")
    assert find_competition(tmp_path / "c") == renamed
    # Several candidates: the one named after the competition.
    _competition(tmp_path / "b" / "input" / "other-competition")
    assert find_competition(tmp_path / "b") == new
    assert find_competition(tmp_path / "b", override=renamed) == renamed
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path / "b"))
    assert layout.kaggle().input == tmp_path / "b" / "input"
    assert layout.kaggle().submission == tmp_path / "b/working/submission.csv"
    monkeypatch.delenv("KAGGLE_ROOT")
    assert layout.kaggle().working == Path("/kaggle/working")


def test_no_or_ambiguous_competition_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "input").mkdir()
    with pytest.raises(InputError, match=r"^no competition folders .*pass --data-dir"):
        find_competition(tmp_path)
    _competition(tmp_path / "input" / "one")
    _competition(tmp_path / "input" / "two")
    with pytest.raises(InputError, match=r"^several competition folders"):
        find_competition(tmp_path)
    with pytest.raises(InputError, match=r"^--data-dir .* has no test.csv"):
        find_competition(tmp_path, override=tmp_path / "input")


# ---- the bundle ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def code_bundle(tiny_head, tiny_ov, tmp_path_factory) -> Path:
    """The code half of ``make kaggle-bundle`` built from the tiny trained runs, by its command
    line (the part first, then options and overrides in any order)."""
    out = tmp_path_factory.mktemp("bundle")
    kaggle_bundle.main(["code", *tiny_ov, "--out", str(out), "--owner", "tester"])
    return out / "code"


def test_code_bundle_holds_code_runs_priors_and_metadata(code_bundle, tiny_head):
    manifest = json.loads((code_bundle / "bundle.json").read_text())
    assert manifest["profile"] == "tiny" and (code_bundle / manifest["config"]).is_file()
    for exp in tiny_head.stages.values():
        for fold in (0, 1):
            run = code_bundle / manifest["runs"] / "rsna" / exp / f"fold{fold}"
            assert sorted(p.name for p in run.iterdir()) == ["best.pth", "config.yaml"]
            state = load_checkpoint(run / "best.pth")
            assert set(state) == set(kaggle_bundle.INFERENCE_KEYS)  # no optimizer state
    assert (code_bundle / manifest["runs"] / "rsna" / "train_priors.json").is_file()
    assert (code_bundle / "inference.py").is_file() and (
        code_bundle / "utils/rsna/kaggle.py"
    ).is_file()
    meta = json.loads((code_bundle / "dataset-metadata.json").read_text())
    assert meta["id"] == f"tester/{kaggle_bundle.CODE_SLUG}"
    kernel = json.loads((ROOT / "kaggle" / "kernel-metadata.json").read_text())
    assert kernel["enable_internet"] == "false" and kernel["enable_gpu"] == "true"
    assert kernel["competition_sources"] == [SLUG] and kernel["code_file"] == NOTEBOOK.name


def test_wheel_requirements_leave_out_kaggles_torch():
    pins = kaggle_bundle.dependency_closure(kaggle_bundle.INFERENCE_PACKAGES)
    assert {"timm", "pydicom", "python-gdcm", "huggingface-hub", "numpy"} <= set(pins)
    assert not {"torch", "torchvision", "triton"} & set(pins)
    assert not any(name.startswith("nvidia-") for name in pins)


def test_a_failing_chain_still_writes_every_row_with_its_prior(
    tiny_data, tmp_path, monkeypatch, caplog
):
    code = tmp_path / "code"
    (code / "runs" / "rsna").mkdir(parents=True)
    config = str(ROOT / "config" / "rsna" / "patient_head.yaml")
    manifest = {"config": config, "profile": "tiny", "overrides": [], "runs": "runs"}
    (code / "bundle.json").write_text(json.dumps(manifest))
    root = tmp_path / "kaggle"
    comp = root / "input" / SLUG
    comp.mkdir(parents=True)
    for name in ("test.csv", "train.csv"):
        shutil.copy(tiny_data / name, comp / name)

    def broken(argv):
        raise RuntimeError("the bundle is broken")

    monkeypatch.setattr(kaggle, "CODE_ROOT", code)
    monkeypatch.setattr(kaggle.inference, "main", broken)
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    kaggle.main([])
    test = pd.read_csv(comp / "test.csv")
    sub = read_submission(root, test)
    np.testing.assert_allclose(sub.fractured, priors_of(tiny_data / "train.csv", test))
    assert "the bundle is broken" in caplog.text


# ---- the notebook -------------------------------------------------------------------------------
def kaggle_tree(root: Path, bundle: Path, competition: Path, test_images: Path, train_csv: Path):
    """A Kaggle-shaped input root: the two attached datasets and the competition folder."""
    inputs = layout.kaggle(root).input
    inputs.mkdir(parents=True)
    (inputs / kaggle_bundle.CODE_SLUG).symlink_to(bundle, target_is_directory=True)
    wheels = inputs / "datasets" / "tester" / kaggle_bundle.WHEELS_SLUG
    wheels.mkdir(parents=True)
    (wheels / "requirements-kaggle.txt").write_text("pyyaml\n")  # installed: pip changes nothing
    competition.mkdir(parents=True)
    (competition / "test_images").symlink_to(test_images, target_is_directory=True)
    shutil.copy(train_csv, competition / "train.csv")
    return competition


def write_test_csv(competition: Path, rows: list[tuple[str, str]]) -> pd.DataFrame:
    """test.csv (and sample_submission.csv) for ``rows`` = (StudyInstanceUID, prediction_type)."""
    test = pd.DataFrame(
        [(f"{u}_{t}", u, t) for u, t in rows],
        columns=["row_id", "StudyInstanceUID", "prediction_type"],
    )
    test.to_csv(competition / "test.csv", index=False)
    test[["row_id"]].assign(fractured=0.5).to_csv(
        competition / "sample_submission.csv", index=False
    )
    return test


def run_notebook(root: Path, monkeypatch, overrides: tuple[str, ...] = ()) -> str:
    """Execute the notebook with ``KAGGLE_ROOT=root``; returns the text it printed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"OVERRIDES = {list(overrides)!r}"))
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    (root / "working").mkdir(exist_ok=True)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}
    ).execute()
    return "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))


def read_submission(root: Path, test: pd.DataFrame) -> pd.DataFrame:
    sub = pd.read_csv(layout.kaggle(root).submission)
    validate_submission(sub, test[["row_id"]].assign(fractured=0.0))
    assert sub.row_id.tolist() == test.row_id.tolist()
    return sub


def priors_of(train_csv: Path, test: pd.DataFrame) -> np.ndarray:
    train = pd.read_csv(train_csv)[TARGETS]
    prior = (train.sum() + 1) / (len(train) + 2)  # add-one smoothed
    return test.prediction_type.map(prior).to_numpy()


def test_notebook_on_the_public_placeholder_predicts_what_is_there(
    code_bundle, tiny_data, tmp_path, monkeypatch
):
    root = tmp_path / "kaggle"
    comp = kaggle_tree(
        root, code_bundle, root / "input" / SLUG, tiny_data / "test_images", tiny_data / "train.csv"
    )
    test = write_test_csv(comp, [(f"1.2.826.0.1.3680043.{n}", "C1") for n in (10197, 10454, 10690)])
    log = run_notebook(root, monkeypatch)
    sub = read_submission(root, test)
    np.testing.assert_allclose(sub.fractured, priors_of(tiny_data / "train.csv", test))
    assert "public placeholder" in log
    # The studies that are there were predicted (stage-1 test predictions of each of them).
    stage1 = next(
        (root / "working" / "output" / "rsna" / "test").glob("*/stage1_vertebra_preds.csv")
    )
    present = sorted(p.name for p in (tiny_data / "test_images").iterdir())
    assert sorted(pd.read_csv(stage1, dtype=str).StudyInstanceUID.unique()) == present


def test_notebook_on_a_full_test_csv_and_with_a_tiny_budget(
    code_bundle, tiny_data, tmp_path, monkeypatch
):
    root = tmp_path / "kaggle"
    comp = root / "input" / "competitions" / SLUG  # the newer mount style
    kaggle_tree(root, code_bundle, comp, tiny_data / "test_images", tiny_data / "train.csv")
    listed = pd.read_csv(tiny_data / "test.csv")
    rows = list(zip(listed.StudyInstanceUID, listed.prediction_type, strict=True))[::-1]
    test = write_test_csv(comp, rows)
    priors = priors_of(tiny_data / "train.csv", test)
    run_notebook(root, monkeypatch)
    sub = read_submission(root, test)
    assert not np.allclose(sub.fractured, priors)  # the studies were predicted
    assert not list((root / "working").rglob("*.npy"))  # no study cache left in working/

    layout.kaggle(root).submission.unlink()
    log = run_notebook(root, monkeypatch, ("submit.budget_s=0.001",))
    sub = read_submission(root, test)
    np.testing.assert_allclose(sub.fractured, priors)
    assert "time budget (0.001 s) spent after 0 of 2 studies" in log
    assert "chain failed" not in log
    for uid in listed.StudyInstanceUID.unique():
        assert uid in log


def test_notebook_submits_what_inference_py_submits(
    code_bundle, tiny_data, tiny_ov, tiny_head, tmp_path, monkeypatch
):
    """The same test folder and trained runs: the notebook's submission (bundle + Kaggle mount)
    equals ``inference.py --split test``'s row by row; the bundle carries every product the
    chain applies (calibration fit, plausibility reference, priors)."""
    manifest = json.loads((code_bundle / "bundle.json").read_text())
    shipped = {p.name for p in (code_bundle / manifest["runs"] / "rsna").iterdir() if p.is_file()}
    assert {p.name for p in chain_products(tiny_head).values()} == shipped
    assert tiny_head.post.calibration == "platt" and tiny_head.post.shrink > 0
    root = tmp_path / "kaggle"
    comp = kaggle_tree(
        root, code_bundle, root / "input" / SLUG, tiny_data / "test_images", tiny_data / "train.csv"
    )
    shutil.copy(tiny_data / "test.csv", comp / "test.csv")
    log = run_notebook(root, monkeypatch)
    assert "not applied" not in log and "chain failed" not in log
    notebook = pd.read_csv(layout.kaggle(root).submission)
    out = tmp_path / "inference.csv"
    ov = [o for o in tiny_ov if not o.startswith("data_dir=")]
    cmd = ["--CFG", str(ROOT / "config" / "rsna" / "patient_head.yaml"), "--split", "test"]
    inference.main([*cmd, "--data-dir", str(comp), "--out", str(out), *ov])
    local = pd.read_csv(out)
    assert len(local) == len(pd.read_csv(comp / "test.csv")) > 0
    pd.testing.assert_frame_equal(notebook, local, check_exact=True)


def test_a_chain_missing_a_product_it_applies_stops_with_one_line(tiny_head, tiny_ov, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(tiny_head.output_dir, out, ignore=shutil.ignore_patterns("test"))
    (out / "rsna" / "calibration.json").unlink()
    ov = [o for o in tiny_ov if not o.startswith("output_dir=")] + [f"output_dir={out}"]
    cmd = ["--CFG", str(ROOT / "config" / "rsna" / "patient_head.yaml"), "--split", "test", *ov]
    with pytest.raises(SystemExit, match=r"^error: .*calibration .*calibration.json"):
        inference.main([*cmd, "--out", str(tmp_path / "sub.csv")])
    assert not (tmp_path / "sub.csv").exists()


# ---- a data set the project did not generate ------------------------------------------------------
def write_foreign_study(folder: Path, n: int, syntax, signed: bool, first_number: int) -> str:
    """A CT series written here with plain pydicom (not utils.rsna.synthetic / write_slice): 2.25
    UIDs, files numbered feet -> head from ``first_number``, optional tags left out."""
    study_uid = generate_uid(prefix=None)
    series_uid, frame_uid = generate_uid(prefix=None), generate_uid(prefix=None)
    folder = folder / study_uid
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[:64, :64]
    for k in range(n):  # k = 0 is the head end
        hu = np.full((64, 64), -1000.0)
        hu[(yy - 32) ** 2 / 400 + (xx - 32) ** 2 / 300 < 1] = 40.0
        hu[(yy - 36 - k % 3) ** 2 + (xx - 32) ** 2 < 49] = 900.0
        hu += rng.normal(0, 5, hu.shape)
        intercept = 0.0 if signed else -1024.0
        stored = np.round(hu - intercept).astype(np.int16 if signed else np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID, ds.Modality, ds.PatientID = frame_uid, "CT", "anon"
        ds.Rows = ds.Columns = 64
        ds.PixelSpacing = [0.8, 0.8]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-25.6, -25.6, 50.0 - 2.0 * k]
        ds.InstanceNumber = n - k
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = int(signed)
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
        ds.PixelData = stored.tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        pydicom.dcmwrite(folder / f"{first_number + n - 1 - k}.dcm", ds, enforce_file_format=True)
    return study_uid


def test_notebook_on_a_data_set_the_project_did_not_generate(
    code_bundle, tiny_data, tmp_path, monkeypatch
):
    images = tmp_path / "foreign_images"
    uids = [
        write_foreign_study(images, 30, RLELossless, signed=True, first_number=1),
        write_foreign_study(images, 36, ExplicitVRLittleEndian, signed=False, first_number=200),
    ]
    root = tmp_path / "kaggle"
    comp = kaggle_tree(root, code_bundle, root / "input" / SLUG, images, tiny_data / "train.csv")
    rows = [(u, t) for t in TARGETS[::-1] for u in uids]  # interleaved studies
    test = write_test_csv(comp, rows)
    (comp / "test.csv").write_text(  # the mle-bench column order
        test[["StudyInstanceUID", "prediction_type", "row_id"]].to_csv(index=False)
    )
    log = run_notebook(root, monkeypatch, ("submit.stage1_stride=2",))
    sub = read_submission(root, test)
    assert "gets the train priors" not in log and "failed" not in log
    assert not np.allclose(sub.fractured, priors_of(tiny_data / "train.csv", test))
