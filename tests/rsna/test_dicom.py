"""utils.rsna.dicom: real wheel DICOMs, synthetic studies in every transfer syntax, odd stacks, damage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from utils.rsna.dicom import (
    BONE_WINDOW,
    StudyReadError,
    _clean_stored,
    _decode_imagecodecs,
    _decoders,
    load_study,
    multi_window,
    read_header,
    window,
)
from utils.rsna.synthetic.writers import TRANSFER_SYNTAXES, write_slice

REPO = Path(__file__).resolve().parents[2]
DICOMDIR_TESTS = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
# (backend, threads) combinations that must give bit-identical volumes.
READERS = [("auto", 1), ("auto", 2), ("dicomsdl", 1), ("pydicom", 1)]


def pydicom_hu(path: Path) -> np.ndarray:
    """(H, W) float64 HU of one file, computed by pydicom alone (the reference)."""
    ds = pydicom.dcmread(path)
    return apply_rescale(ds.pixel_array, ds)


def copy_numbered(sources: list[Path], study: Path, numbers: list[int]) -> Path:
    """Copy ``sources`` into ``study`` as ``<number>.dcm``."""
    study.mkdir(parents=True)
    for src, n in zip(sources, numbers, strict=True):
        shutil.copy(src, study / f"{n}.dcm")
    return study


def write_series(
    study: Path,
    hu: np.ndarray,
    positions: list[tuple[float, float, float]],
    numbers: list[int],
    **kwargs,
) -> Path:
    """Write ``hu`` (Z, H, W) as ``<number>.dcm`` slices at ``positions`` (IPP, mm)."""
    for k, (pos, n) in enumerate(zip(positions, numbers, strict=True)):
        write_slice(
            study / f"{n}.dcm",
            hu[k],
            study_uid="1.2.826.0.1.3680043.8.498.7",
            series_uid="1.2.826.0.1.3680043.8.498.7.1",
            sop_uid=f"1.2.826.0.1.3680043.8.498.7.1.{n}",
            instance_number=n,
            position=pos,
            **kwargs,
        )
    return study


def integer_hu(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random integer HU in [-1024, 2000] (exactly representable by every writer setting)."""
    return rng.integers(-1024, 2000, size=shape).astype(np.float64)


def load_all_backends(study: Path):
    """Load with every backend; assert bit-identical HU and the same order; return the first."""
    first, *others = (load_study(study, backend=b, threads=t) for b, t in READERS)
    assert first.hu.dtype == np.float32
    for other in others:
        assert np.array_equal(first.hu, other.hu)
        assert np.array_equal(first.file_numbers, other.file_numbers)
        assert first.skipped == other.skipped
    return first


# ---- real files from the pydicom / pydicom-data wheels -----------------------------------------
def test_ct_small_single_slice(tmp_path):
    src = Path(get_testdata_file("CT_small.dcm"))
    study = load_all_backends(copy_numbered([src], tmp_path / "ct_small", [1]))
    assert study.uid == "ct_small"
    assert study.hu.shape == (1, 128, 128)
    assert np.array_equal(study.hu[0], pydicom_hu(src))
    assert study.pixel_spacing == pytest.approx((0.661468, 0.661468))
    assert study.z_spacing == 5.0  # one slice: falls back to SliceThickness
    assert study.transfer_syntaxes == ("1.2.840.10008.1.2.1",)
    assert (study.n_files, study.skipped, study.n_duplicates) == (1, (), 0)


@pytest.mark.parametrize(
    "numbers", [[1, 2, 3, 4, 5], [4, 1, 5, 3, 2]], ids=["instance", "shuffled"]
)
def test_real_series_head_to_feet_ordered_by_position(tmp_path, numbers):
    # CT5N: z falls with InstanceNumber (head -> feet, like most RSNA studies).
    sources = sorted(
        DICOMDIR_TESTS.glob("98892001/CT5N/*"), key=lambda p: pydicom.dcmread(p).InstanceNumber
    )
    study = load_all_backends(copy_numbered(sources, tmp_path / "ct5n", numbers))
    z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in sources]
    head_first = np.argsort(z)[::-1]
    assert study.file_numbers.tolist() == [numbers[i] for i in head_first]
    for k, i in enumerate(head_first):
        assert np.array_equal(study.hu[k], pydicom_hu(sources[i]))
    assert study.reversed == (numbers[head_first[0]] > numbers[head_first[-1]])
    assert np.allclose(np.diff(study.positions), 2.5)
    assert study.z_spacing == pytest.approx(2.5)


def test_real_series_feet_to_head_nonuniform(tmp_path):
    # CT2: z rises with InstanceNumber (feet -> head) with a 202.5 mm gap.
    sources = sorted(
        DICOMDIR_TESTS.glob("77654033/CT2/*"), key=lambda p: pydicom.dcmread(p).InstanceNumber
    )
    study = load_all_backends(copy_numbered(sources, tmp_path / "ct2", [1, 2, 3, 4]))
    assert study.file_numbers.tolist() == [4, 3, 2, 1]
    assert study.reversed
    for k, src in enumerate(sources[::-1]):
        assert np.array_equal(study.hu[k], pydicom_hu(src))
    assert np.diff(study.positions) == pytest.approx([1.25, 1.25, 202.5], abs=1e-4)
    assert study.z_spacing == pytest.approx(1.25, abs=1e-4)


def test_real_jpeg_lossless_neck_ct(tmp_path):
    src = get_testdata_file("bad_sequence.dcm")
    if src is None:
        pytest.skip("pydicom-data is not installed")
    study = load_all_backends(copy_numbered([Path(src)], tmp_path / "neck", [1]))
    assert study.hu.shape == (1, 512, 512)
    assert np.array_equal(study.hu[0], pydicom_hu(Path(src)))
    assert (study.hu.min(), study.hu.max()) == (-1011.0, 1243.0)
    assert study.transfer_syntaxes == ("1.2.840.10008.1.2.4.70",)


# ---- synthetic studies --------------------------------------------------------------------------
@pytest.mark.parametrize("representation", [0, 1])
@pytest.mark.parametrize("syntax", list(TRANSFER_SYNTAXES))
def test_every_transfer_syntax_round_trips(tmp_path, syntax, representation):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1500.0, 2500.0, size=(3, 24, 26))  # non-square, fractional HU
    write_series(
        tmp_path / "s",
        hu,
        [(0.0, 0.0, -k) for k in range(3)],
        [1, 2, 3],
        transfer_syntax=syntax,
        pixel_representation=representation,
    )
    study = load_all_backends(tmp_path / "s")
    expected = np.rint(hu + 1024.0) - 1024.0  # the writer rounds stored values (intercept -1024)
    if representation == 0:
        expected = np.maximum(expected, -1024.0)  # uint16 cannot store HU below the intercept
    assert study.hu.shape == (3, 24, 26)
    assert np.array_equal(study.hu, expected)
    assert study.transfer_syntaxes == (str(TRANSFER_SYNTAXES[syntax]),)


def test_jpeg_lossless_fast_decoder_matches_pydicom(tmp_path):
    # "auto" hands complete JPEG Lossless files to imagecodecs: check that decoder on its own.
    hu = integer_hu(np.random.default_rng(11), (1, 24, 26))
    sources = [
        write_series(
            tmp_path / "s",
            hu,
            [(0.0, 0.0, 0.0)],
            [1],
            transfer_syntax="jpeg_lossless",
            pixel_representation=1,
        )
        / "1.dcm"
    ]
    if get_testdata_file("bad_sequence.dcm") is not None:
        sources.append(Path(get_testdata_file("bad_sequence.dcm")))  # real, BitsStored 12
    for src in sources:
        header = read_header(src)
        assert header.pixels_complete and len(header.fragments) == 1
        assert _decoders(header, "auto")[0] is _decode_imagecodecs
        stored = _clean_stored(_decode_imagecodecs(header), header.bits_stored, header.signed)
        reference = pydicom.dcmread(src).pixel_array
        assert stored.dtype == reference.dtype and np.array_equal(stored, reference)


def test_fractional_rescale_is_bit_identical_between_backends(tmp_path):
    hu = integer_hu(np.random.default_rng(1), (2, 8, 8)) / 2
    write_series(
        tmp_path / "s",
        hu,
        [(0.0, 0.0, 0.0), (0.0, 0.0, -1.0)],
        [1, 2],
        rescale_slope=0.5,
        rescale_intercept=-1000.5,
        pixel_representation=1,
    )
    study = load_all_backends(tmp_path / "s")
    assert np.allclose(study.hu, hu, atol=0.25)


def test_reversed_stack_starting_at_two(tmp_path):
    hu = integer_hu(np.random.default_rng(2), (4, 8, 8))
    # Files 2..5 climb from the feet (z = 0) to the head (z = 3).
    write_series(tmp_path / "s", hu, [(0.0, 0.0, float(k)) for k in range(4)], [2, 3, 4, 5])
    study = load_all_backends(tmp_path / "s")
    assert study.reversed
    assert study.file_numbers.tolist() == [5, 4, 3, 2]
    assert np.array_equal(study.hu, hu[::-1])
    assert np.allclose(np.diff(study.positions), 1.0) and study.z_spacing == pytest.approx(1.0)


def test_duplicated_stack_is_deduplicated(tmp_path, caplog):
    hu = integer_hu(np.random.default_rng(3), (3, 8, 8))
    positions = [(0.0, 0.0, -0.5 * k) for k in range(3)]
    # The whole stack stored twice (files 1-3, then 4-6): an IPP sort interleaves the copies.
    write_series(tmp_path / "s", np.concatenate([hu, hu]), positions * 2, [1, 2, 3, 4, 5, 6])
    study = load_all_backends(tmp_path / "s")
    assert study.n_duplicates == 3 and study.n_files == 6
    assert study.file_numbers.tolist() == [1, 2, 3]
    assert np.array_equal(study.hu, hu)
    assert study.z_spacing == pytest.approx(0.5)
    assert "duplicate positions" in caplog.text


def test_tilted_stack_orders_by_position_along_normal(tmp_path):
    # Oblique plane (15 degrees about x) with irregular steps along its normal and shuffled names.
    angle = np.deg2rad(15)
    col = (0.0, np.cos(angle), np.sin(angle))
    feetward = -np.cross((1.0, 0.0, 0.0), col)  # the normal has +z, so feet are along -normal
    steps = np.array([0.0, 0.8, 1.6, 2.8])
    origin = np.array([-100.0, -80.0, 40.0])
    positions = [tuple(origin + s * feetward) for s in steps]
    hu = integer_hu(np.random.default_rng(4), (4, 8, 8))
    write_series(
        tmp_path / "s",
        hu,
        positions,
        [3, 1, 4, 2],
        orientation=(1.0, 0.0, 0.0, *col),
    )
    study = load_all_backends(tmp_path / "s")
    assert study.file_numbers.tolist() == [3, 1, 4, 2]
    assert np.array_equal(study.hu, hu)
    assert np.diff(study.positions) == pytest.approx([0.8, 0.8, 1.2])
    assert study.z_spacing == pytest.approx(0.8)


def test_ipp_drift_and_flipped_orientation(tmp_path):
    # IOP [1,0,0,0,-1,0]: the cross-product normal points to -z; head must still come first.
    hu = integer_hu(np.random.default_rng(5), (4, 8, 8))
    positions = [(0.3 * k, -0.2 * k, 10.0 - 0.625 * k) for k in range(4)]
    write_series(tmp_path / "s", hu, positions, [4, 3, 2, 1], orientation=(1, 0, 0, 0, -1, 0))
    study = load_all_backends(tmp_path / "s")
    assert study.file_numbers.tolist() == [4, 3, 2, 1] and study.reversed
    assert np.array_equal(study.hu, hu)
    assert study.z_spacing == pytest.approx(0.625)


def test_768_slices(tmp_path):
    hu = integer_hu(np.random.default_rng(6), (2, 768, 768))
    write_series(tmp_path / "s", hu, [(0.0, 0.0, 0.0), (0.0, 0.0, -1.0)], [1, 2])
    study = load_all_backends(tmp_path / "s")
    assert (study.n_slices, study.rows, study.cols) == (2, 768, 768)
    assert np.array_equal(study.hu, hu)


def test_odd_size_slice_is_skipped_and_filled(tmp_path, caplog):
    rng = np.random.default_rng(7)
    hu = integer_hu(rng, (3, 24, 26))
    write_series(tmp_path / "s", hu, [(0.0, 0.0, -k) for k in range(3)], [1, 2, 3])
    write_series(tmp_path / "s", integer_hu(rng, (1, 26, 24)), [(0.0, 0.0, -2.5)], [4])
    study = load_all_backends(tmp_path / "s")
    assert study.skipped == (4,)
    assert study.file_numbers.tolist() == [1, 2, 3, 4]
    assert np.array_equal(study.hu[3], hu[2])  # nearest decoded neighbour (z = -2)
    assert "slice 4 not decoded" in caplog.text


def test_unreadable_header_keeps_its_place_and_is_filled(tmp_path, caplog):
    """Its number places it (numbers follow positions), so the slice count still pairs."""
    hu = integer_hu(np.random.default_rng(8), (3, 8, 8))
    study_dir = write_series(tmp_path / "s", hu, [(0.0, 0.0, -k) for k in (0, 1, 3)], [1, 2, 4])
    (study_dir / "3.dcm").write_bytes(b"not a dicom file at all" * 10)
    (study_dir / "notes.dcm").write_bytes(b"x")
    study = load_all_backends(study_dir)
    assert study.skipped == (3,) and study.n_files == 5
    assert study.file_numbers.tolist() == [1, 2, 3, 4]
    assert np.array_equal(study.hu[[0, 1, 3]], hu) and np.array_equal(study.hu[2], hu[1])
    assert "slice 3 header unreadable" in caplog.text and "notes.dcm" in caplog.text


def test_unreadable_header_is_dropped_when_numbers_do_not_follow_positions(tmp_path, caplog):
    hu = integer_hu(np.random.default_rng(9), (3, 8, 8))
    study_dir = write_series(
        tmp_path / "s", hu, [(0.0, 0.0, 0.0), (0.0, 0.0, -2.0), (0.0, 0.0, -1.0)], [1, 2, 3]
    )
    (study_dir / "4.dcm").write_bytes(b"not a dicom file at all" * 10)
    study = load_all_backends(study_dir)
    assert study.skipped == (4,) and study.n_slices == 3
    assert "dropped unreadable slices [4]" in caplog.text


# Damaged files run in a child process: dicomsdl 0.109.4 segfaults on a file truncated inside its
# pixel data, and this test must report that regression instead of dying with it.
_CHILD = """
import json, sys
from utils.rsna.dicom import load_study
results = {}
for study, backend in json.loads(sys.argv[1]):
    s = load_study(study, backend=backend)
    results[f"{study}|{backend}"] = {"skipped": list(s.skipped), "hu": s.hu.tolist()}
print(json.dumps(results))
"""
_TRUNCATED_BACKENDS = ("auto", "dicomsdl", "pydicom")


@pytest.fixture(scope="module")
def truncated_results(tmp_path_factory):
    """Per (syntax, backend): the loaded study with slice 2 (of 4) cut inside its pixel data."""
    root = tmp_path_factory.mktemp("truncated")
    hu = integer_hu(np.random.default_rng(9), (4, 16, 16))
    positions = [(0.0, 0.0, z) for z in (0.0, -1.0, -1.5, -3.0)]
    jobs = []
    for syntax in ("explicit", "jpeg_lossless"):
        study = write_series(root / syntax, hu, positions, [1, 2, 3, 4], transfer_syntax=syntax)
        damaged = study / "2.dcm"
        data = damaged.read_bytes()
        pixel_bytes = len(pydicom.dcmread(damaged).PixelData)  # pixel data is the last element
        damaged.write_bytes(data[: len(data) - pixel_bytes // 2])
        assert not read_header(damaged).pixels_complete
        jobs += [(str(study), backend) for backend in _TRUNCATED_BACKENDS]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(jobs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, f"child died (rc {child.returncode}): {child.stderr[-2000:]}"
    return hu, root, json.loads(child.stdout)


@pytest.mark.parametrize("backend", _TRUNCATED_BACKENDS)
@pytest.mark.parametrize("syntax", ["explicit", "jpeg_lossless"])
def test_truncated_slice_is_skipped_and_filled(truncated_results, syntax, backend):
    hu, root, results = truncated_results
    result = results[f"{root / syntax}|{backend}"]
    loaded = np.array(result["hu"], dtype=np.float32)
    assert result["skipped"] == [2]
    assert np.array_equal(loaded[[0, 2, 3]], hu[[0, 2, 3]])
    assert np.array_equal(loaded[1], hu[2])  # nearest by position: z = -1.5, not z = 0


def test_empty_missing_and_undecodable_studies_raise(tmp_path):
    (tmp_path / "empty_study").mkdir()
    with pytest.raises(StudyReadError, match="empty_study"):
        load_study(tmp_path / "empty_study")
    with pytest.raises(StudyReadError, match="missing_study"):
        load_study(tmp_path / "missing_study")
    garbage = tmp_path / "garbage_study"
    garbage.mkdir()
    (garbage / "1.dcm").write_bytes(b"\0" * 64)
    with pytest.raises(StudyReadError, match="garbage_study"):
        load_study(garbage)
    with pytest.raises(ValueError, match="backend"):
        load_study(garbage, backend="gdcm")


# ---- writer and windows -------------------------------------------------------------------------
def test_write_slice_is_deterministic_part10(tmp_path):
    hu = integer_hu(np.random.default_rng(10), (1, 8, 8))
    for name in ("a", "b"):
        write_series(tmp_path / name, hu, [(1.0, 2.0, 3.0)], [7], transfer_syntax="jpeg_lossless")
    data = (tmp_path / "a" / "7.dcm").read_bytes()
    assert data == (tmp_path / "b" / "7.dcm").read_bytes()
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(tmp_path / "a" / "7.dcm")
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    assert ds.Modality == "CT" and ds.RescaleType == "HU" and ds.InstanceNumber == 7
    assert ds.PatientID == ds.StudyInstanceUID
    assert ds.FrameOfReferenceUID not in (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == BONE_WINDOW
    assert list(ds.ImagePositionPatient) == [1.0, 2.0, 3.0]
    assert list(tmp_path.rglob("*.tmp")) == []


def test_write_slice_rejects_bad_input(tmp_path):
    kwargs = dict(study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4", instance_number=1)
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_slice(
            tmp_path / "1.dcm",
            np.zeros((4, 4)),
            position=(0, 0, 0),
            transfer_syntax="png",
            **kwargs,
        )
    with pytest.raises(ValueError, match="2-D"):
        write_slice(tmp_path / "1.dcm", np.zeros((2, 4, 4)), position=(0, 0, 0), **kwargs)
    assert not (tmp_path / "1.dcm").exists()


def test_window_values():
    hu = np.array([-1000.0, -500.0, 400.0, 1300.0, 3000.0], dtype=np.float32)
    assert window(hu, *BONE_WINDOW).tolist() == [0, 0, 128, 255, 255]
    assert window(np.array([0.0, 50.0, 100.0]), 50.0, 100.0).tolist() == [0, 128, 255]
    stacked = multi_window(hu.reshape(1, 5), [BONE_WINDOW, (40.0, 400.0)])
    assert stacked.shape == (1, 5, 2) and stacked.dtype == np.uint8
    assert np.array_equal(stacked[..., 0], window(hu, *BONE_WINDOW).reshape(1, 5))
    assert stacked[0, :, 1].tolist() == [0, 0, 255, 255, 255]
    with pytest.raises(ValueError, match="width"):
        window(hu, 0.0, 0.0)
