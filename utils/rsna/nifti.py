"""RSNA 2022 segmentation NIfTI files <-> label volumes aligned with ``utils.rsna.dicom.Study.hu``.

The competition's ``segmentations/<uid>.nii`` arrays come out of nibabel as (x = DICOM column,
y = DICOM row flipped, z = feet -> head). The rule shared by the top solutions,
``arr[:, ::-1, ::-1].transpose(2, 1, 0)``, turns that into (slice head -> feet, row, col), the
order of ``Study.hu``. Label values: 0 background, 1-7 = C1-C7, 8-19 = T1-T12 (kept as they are).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

C1, C7 = 1, 7


def load_rsna_seg(path: str | Path, n_slices: int | None = None, study: str = "") -> np.ndarray:
    """Read a segmentation as (Z, H, W) uint8 labels ordered head -> feet, rows and cols as DICOM.

    ``n_slices``: the study's slice count (``Study.n_slices``), checked when given. Raises
    ``ValueError`` naming ``study`` and the file when the array is not 3-D, holds values that are
    not labels 0..255, has another slice count, or has the C1 centroid below the C7 one.
    """
    name = f"study {study} ({path})" if study else str(path)
    raw = np.asanyarray(nib.load(path).dataobj)  # stored values; get_fdata() would give float64
    if raw.ndim != 3:
        raise ValueError(f"{name}: segmentation must be 3-D, got shape {raw.shape}")
    labels = as_labels(raw, name)
    vol = np.ascontiguousarray(labels[:, ::-1, ::-1].transpose(2, 1, 0))
    if n_slices is not None and vol.shape[0] != n_slices:
        raise ValueError(f"{name}: segmentation has {vol.shape[0]} slices, the study {n_slices}")
    _check_head_to_feet(vol, name)
    return vol


def as_labels(raw: np.ndarray, name: str) -> np.ndarray:
    """Any-dtype (x, y, z) array of integer-valued labels -> uint8 (rounded when float)."""
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise ValueError(f"{name}: segmentation holds NaN or infinite values")
        raw = np.rint(raw)
    elif raw.dtype.kind not in "iu":
        raise ValueError(f"{name}: segmentation dtype {raw.dtype} is not numeric")
    low, high = raw.min(), raw.max()
    if low < 0 or high > 255:
        raise ValueError(f"{name}: values {low}..{high} are not labels 0..255")
    return raw.astype(np.uint8)


def _check_head_to_feet(vol: np.ndarray, name: str) -> None:
    """Raise when the C1 centroid slice does not come before the C7 one (a z-flipped volume)."""
    counts = [np.count_nonzero(vol == label, axis=(1, 2)) for label in (C1, C7)]
    if not all(c.any() for c in counts):
        return
    c1, c7 = (np.average(np.arange(vol.shape[0]), weights=c) for c in counts)
    if c1 >= c7:
        raise ValueError(
            f"{name}: C1 centroid at slice {c1:.1f} is not above C7 at {c7:.1f}; "
            "the volume is not head -> feet (wrong orientation?)"
        )


def to_file_order(vol: np.ndarray, reversed: bool) -> np.ndarray:
    """Reorder a head -> feet array (axis 0 = slices) to ascending file number (``<n>.dcm``).

    ``reversed`` is ``Study.reversed``: ascending file numbers run feet -> head, so axis 0 is
    flipped; otherwise the array is returned as is. Works for labels, HU or per-slice tables alike.
    ``to_file_order(vol, s.reversed)[i]`` pairs with ``np.sort(s.file_numbers)[i]`` (a view).
    """
    return vol[::-1] if reversed else vol
