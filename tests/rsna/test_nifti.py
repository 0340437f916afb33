"""utils.rsna.nifti: RSNA orientation round trip, pairing with DICOM file numbers, checks, real files."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from utils.rsna.dicom import load_study
from utils.rsna.nifti import load_rsna_seg, to_file_order
from utils.rsna.synthetic.writers import save_rsna_seg, write_slice


def spine_labels(n_slices: int = 7, rows: int = 5, cols: int = 4) -> np.ndarray:
    """(Z, H, W) uint8 head -> feet: slice k carries C(k+1) in an asymmetric blob, so flips show."""
    labels = np.zeros((n_slices, rows, cols), dtype=np.uint8)
    for k in range(n_slices):
        labels[k, : 1 + k % rows, : 1 + k % (cols - 1)] = min(k + 1, 19)
    labels[:, -1, -1] = 0
    return labels


def test_round_trip_and_raw_orientation(tmp_path):
    labels = spine_labels()
    path = tmp_path / "seg.nii"
    save_rsna_seg(path, labels, pixel_spacing=(0.4, 0.3), z_spacing=0.625)
    assert np.array_equal(load_rsna_seg(path, n_slices=7, study="1.2.3"), labels)
    image = nib.load(path)
    raw = np.asanyarray(image.dataobj)
    assert raw.dtype == np.uint8 and raw.shape == (4, 5, 7)  # (x = col, y = row, z)
    assert np.array_equal(raw, labels.transpose(2, 1, 0)[:, ::-1, ::-1])
    assert raw[:, :, -1].max() == 1  # C1 sits at the top of the raw z axis (feet -> head)
    assert image.header.get_zooms() == pytest.approx((0.3, 0.4, 0.625))
    assert list(tmp_path.iterdir()) == [path]


def test_reversed_study_pairs_with_file_numbers(tmp_path):
    # Files 1..4 run feet -> head; each slice's HU holds its file number.
    for n in range(1, 5):
        write_slice(
            tmp_path / "study" / f"{n}.dcm",
            np.full((5, 4), 100.0 * n),
            study_uid="1.2.9",
            series_uid="1.2.9.1",
            sop_uid=f"1.2.9.1.{n}",
            instance_number=n,
            position=(0.0, 0.0, float(n)),
        )
    study = load_study(tmp_path / "study")
    assert study.reversed
    labels = spine_labels(n_slices=4)
    save_rsna_seg(tmp_path / "seg.nii", labels)
    seg = load_rsna_seg(tmp_path / "seg.nii", n_slices=study.n_slices)
    by_file = to_file_order(seg, study.reversed)
    hu_by_file = to_file_order(study.hu, study.reversed)
    for i, n in enumerate(np.sort(study.file_numbers)):
        assert hu_by_file[i, 0, 0] == 100.0 * n
        assert np.array_equal(by_file[i], labels[study.n_slices - n])  # file 4 is the head slice
    assert to_file_order(seg, False) is seg


def test_slice_count_and_orientation_checks(tmp_path):
    path = tmp_path / "seg.nii"
    save_rsna_seg(path, spine_labels())
    with pytest.raises(ValueError, match=r"study 1\.2\.3 .*7 slices, the study 8"):
        load_rsna_seg(path, n_slices=8, study="1.2.3")
    save_rsna_seg(path, spine_labels()[::-1])  # C7 above C1: a z-flipped volume
    with pytest.raises(ValueError, match="C1 centroid"):
        load_rsna_seg(path, study="1.2.3")
    with pytest.raises(ValueError, match="uncompressed"):
        save_rsna_seg(tmp_path / "seg.nii.gz", spine_labels())


def test_float_stored_labels_are_rounded(tmp_path):
    labels = spine_labels()
    raw = labels.transpose(2, 1, 0)[:, ::-1, ::-1].astype(np.float32) + 0.01
    nib.save(nib.Nifti1Image(raw, np.eye(4)), tmp_path / "float.nii")
    loaded = load_rsna_seg(tmp_path / "float.nii")
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, labels)


def test_real_nibabel_files(tmp_path):
    anatomical = nib.load(
        os.path.join(data_path, "anatomical.nii")
    )  # (33, 41, 25) big-endian int16
    with pytest.raises(ValueError, match=r"-610\.\.30393 are not labels"):
        load_rsna_seg(os.path.join(data_path, "anatomical.nii"))
    with pytest.raises(ValueError, match="3-D"):
        load_rsna_seg(os.path.join(data_path, "functional.nii"), study="4d")

    # The same big-endian int16 header carrying label values goes through the uint8 path.
    values = np.asanyarray(anatomical.dataobj)
    labels_raw = np.clip(values // 5000, 0, 6).astype(">i2")
    relabelled = nib.Nifti1Image(labels_raw, anatomical.affine, anatomical.header)
    nib.save(relabelled, tmp_path / "anat_labels.nii")
    assert nib.load(tmp_path / "anat_labels.nii").get_data_dtype() == np.dtype(">i2")
    loaded = load_rsna_seg(tmp_path / "anat_labels.nii", n_slices=25)
    assert loaded.dtype == np.uint8 and loaded.shape == (25, 41, 33)
    assert np.array_equal(loaded, labels_raw[:, ::-1, ::-1].transpose(2, 1, 0))

    standard = load_rsna_seg(os.path.join(data_path, "standard.nii.gz"))  # uint8, qform 0
    assert standard.shape == (7, 5, 4) and set(np.unique(standard)) == {0, 255}
