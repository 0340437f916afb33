"""Pancreas quiz -> nnU-Net raw dataset: ``python -m utils.preprocess_data --pipeline pancreas [--data-dir D] [key=value ...]``.

Writes, under ``<output_dir>/pancreas/nnunet/raw/Dataset<id>_<name>/``:

- ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz`` for the train and validation cases
  (case id = the file stem, e.g. ``quiz_0_041``); labels rounded to {0, 1, 2} and stored as uint8;
- ``imagesTs/<case>_0000.nii.gz`` for the test cases;
- ``dataset.json`` (channel ``CT``, labels background/pancreas/lesion);
- the case-label CSV (``nnunet.trainer_options.case_labels``: ``case_id, subtype, split``), the
  only place trainers learn a case's subtype (by case id, never from its file name);

and ``<output_dir>/pancreas/prep/cases.csv`` (every case, for the fold file). A case already
converted is kept (files are written atomically, so an existing one is complete). A mask whose
values are not within 1e-3 of a label, or whose shape differs from its image's, is logged with
its path and the case skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from utils import paths
from utils.errors import InputError
from utils.io import atomic_path, write_csv, write_text
from utils.pancreas import layout

log = logging.getLogger(__name__)
CONFIG = Path(__file__).resolve().parents[2] / "config" / "pancreas" / "base.yaml"
LABELS = {"background": 0, "pancreas": 1, "lesion": 2}
LABEL_TOLERANCE = 1e-3  # masks store 1 as 1.0000153: round, but refuse values far from any label


def round_labels(
    mask: np.ndarray, allowed: tuple[int, ...], tol: float = LABEL_TOLERANCE
) -> np.ndarray:
    """Nearest integer label of every voxel as uint8; ValueError if a value is off by > ``tol``.

    ``mask``: any shape, any numeric dtype (e.g. float32 holding 1.0000153 for label 1).
    """
    values = np.unique(mask)
    nearest = np.rint(values)
    bad = values[(np.abs(values - nearest) > tol) | ~np.isin(nearest, allowed)]
    if bad.size:
        raise ValueError(
            f"mask values {bad[:5].tolist()} are not labels {list(allowed)} (tolerance {tol})"
        )
    return np.rint(mask).astype(np.uint8)


def cases_csv(cfg) -> Path:
    """The conversion's case table (``case_id, split, subtype``) that the fold file is made from."""
    return paths.prep_dir(cfg) / "cases.csv"


def _copy(src: str, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _write_labels(mask_path: str, image_path: str, dst: Path) -> None:
    """Round the mask at ``mask_path`` and write it as uint8 NIfTI with its own affine."""
    mask = nib.load(mask_path)
    shape = nib.load(image_path).shape
    if mask.shape != shape:
        raise ValueError(f"shape {mask.shape} != image shape {shape}")
    labels = round_labels(np.asanyarray(mask.dataobj), tuple(LABELS.values()))
    out = nib.Nifti1Image(labels, mask.affine, header=mask.header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    with atomic_path(dst) as tmp:
        # nibabel picks the format from the suffix: write .nii.gz beside, then move onto tmp.
        gz = tmp.with_name(tmp.name + ".nii.gz")
        nib.save(out, gz)
        gz.replace(tmp)


def _intact_copy(src: str, dst: Path) -> bool:
    """``dst`` exists with ``src``'s size (a truncated copy has fewer bytes)."""
    return dst.is_file() and dst.stat().st_size == Path(src).stat().st_size


def _intact_labels(path: Path) -> bool:
    """``path`` decodes to the end (gzip detects a truncated stream)."""
    try:
        np.asarray(nib.load(path).dataobj)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError):
        return False
    return True


def convert_case(row, raw: Path) -> None:
    """Write one case into the raw dataset; files already there and intact are kept, damaged
    ones (a killed copy, a full disk) are written again."""
    if row.split == layout.TEST_SPLIT:
        dst = raw / "imagesTs" / layout.image_name(row.case_id)
        if not _intact_copy(row.image, dst):
            _copy(row.image, dst)
        return
    image, label = (
        raw / "imagesTr" / layout.image_name(row.case_id),
        raw / "labelsTr" / layout.mask_name(row.case_id),
    )
    if not (label.is_file() and _intact_labels(label)):
        _write_labels(row.mask, row.image, label)
    if not _intact_copy(row.image, image):
        _copy(row.image, image)


def convert(table: pd.DataFrame, raw: Path) -> pd.DataFrame:
    """Convert every case of ``table`` (layout.COLUMNS); returns the rows converted (bad ones logged)."""
    keep = []
    for i, row in enumerate(table.itertuples(index=False)):
        try:
            convert_case(row, raw)
        except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as err:
            log.warning("skipping %s: %s", row.mask or row.image, err)
            continue
        keep.append(i)
    return table.iloc[keep].reset_index(drop=True)


def dataset_json(num_training: int) -> str:
    return (
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": LABELS,
                "numTraining": num_training,
                "file_ending": layout.MASK_SUFFIX,
            },
            indent=2,
        )
        + "\n"
    )


def run(cfg, workers: int = 1) -> str:
    """The pipeline's conversion -> the nnU-Net raw dataset + the case-label CSV (one process)."""
    table = layout.scan(paths.data_dir(cfg))
    raw = paths.nnunet_raw_dataset(cfg)
    table = convert(table, raw)
    labelled = table[table["split"] != layout.TEST_SPLIT]
    if labelled.empty:
        raise InputError(f"no labelled case converted from {paths.data_dir(cfg)}")
    write_csv(labelled[[layout.ID, "subtype", "split"]], layout.nnunet_case_labels(cfg))
    write_text(dataset_json(len(labelled)), raw / "dataset.json")
    out = write_csv(table[[layout.ID, "split", "subtype"]], cases_csv(cfg))
    counts = labelled.groupby(["split", "subtype"]).size().to_dict()
    n_test = int((table["split"] == layout.TEST_SPLIT).sum())
    return f"wrote {raw}: {len(labelled)} labelled cases {counts}, {n_test} test cases; {out}"
