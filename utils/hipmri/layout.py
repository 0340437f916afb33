"""The HipMRI 2D slice layout: folder and file names, and image <-> mask pairing by name.

::

    keras_slices_{train,validate,test}/case_<p>_week_<w>_slice_<s>.nii.gz       images
    keras_slices_seg_{train,validate,test}/seg_<p>_week_<w>_slice_<s>.nii.gz    masks

Images and masks are paired by replacing ``case_`` with ``seg_`` in the file name, never by
sorted position (a lexical sort puts ``slice_10`` before ``slice_2``, and a missing file shifts
every later pair). Files without a partner or with another name are logged and skipped.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from utils.errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "validate", "test")
ID = "slice_id"  # the image file name without extension, e.g. case_004_week_0_slice_10
COLUMNS = (ID, "patient", "week", "slice", "split", "image", "mask")
_NAME = re.compile(r"^(case|seg)_(\d+)_week_(\d+)_slice_(\d+)\.nii(?:\.gz)?$")


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / f"keras_slices_{split}"


def mask_dir(root: Path, split: str) -> Path:
    return Path(root) / f"keras_slices_seg_{split}"


def image_name(patient: str, week: int, slice_: int) -> str:
    return f"case_{patient}_week_{week}_slice_{slice_}.nii.gz"


def mask_name_of(image_file: str) -> str:
    """``case_004_week_0_slice_10.nii.gz`` -> ``seg_004_week_0_slice_10.nii.gz``."""
    if not image_file.startswith("case_"):
        raise ValueError(f"not a HipMRI image name (case_...): {image_file}")
    return "seg_" + image_file[len("case_") :]


def _scan(folder: Path, prefix: str) -> dict[tuple[str, str, str], Path]:
    """(patient, week, slice) -> file for the files of ``folder`` named ``<prefix>_...``."""
    found: dict[tuple[str, str, str], Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if match is None or match.group(1) != prefix:
            log.warning("skipping %s: not named %s_<p>_week_<w>_slice_<s>.nii[.gz]", path, prefix)
            continue
        key = match.group(2, 3, 4)
        if key in found:
            log.warning("skipping %s: same slice as %s", path, found[key])
            continue
        found[key] = path
    return found


def pair_split(root: Path, split: str, masks_optional: bool = False) -> pd.DataFrame:
    """Rows (``COLUMNS``) of one split, image and mask paired by name, sorted by id.

    Unpaired files are logged and skipped; with ``masks_optional`` (test images to predict) an
    image without a mask is kept with ``mask == ""``. Missing image folder: ``InputError``.
    """
    folder = image_dir(root, split)
    if not folder.is_dir():
        raise InputError(f"{folder} not found: data_dir must hold keras_slices_{split}/")
    images, masks = _scan(folder, "case"), _scan(mask_dir(root, split), "seg")
    rows = []
    for key, image in images.items():
        mask = masks.pop(key, None)
        if mask is None and not masks_optional:
            log.warning("skipping %s: no mask %s", image, mask_name_of(image.name))
            continue
        patient, week, slice_ = key
        rows.append(
            (
                image.name.split(".")[0],
                patient,
                int(week),
                int(slice_),
                split,
                str(image),
                str(mask) if mask is not None else "",
            )
        )
    for mask in masks.values():
        log.warning("skipping %s: no image case_%s", mask, mask.name[len("seg_") :])
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values(["patient", "week", "slice"], ignore_index=True)
