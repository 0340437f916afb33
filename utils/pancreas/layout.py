"""The pancreas quiz layout (ML-Quiz-3DMedImg): folder and file names, one row per case.

::

    train/subtype{0,1,2}/quiz_<s>_<id>.nii.gz  +  quiz_<s>_<id>_0000.nii.gz   mask + CT image
    validation/subtype{0,1,2}/...                                             same naming
    test/quiz_<id>_0000.nii.gz                                                images only

The subtype of a labelled case is its folder (``subtype<k>``); the case id is the file stem
(``quiz_0_041``). Images and masks are paired by name; a file without its partner, another name
or a duplicate case id is logged with its path and skipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from utils import paths
from utils.errors import InputError

log = logging.getLogger(__name__)

LABELLED_SPLITS = ("train", "validation")
TEST_SPLIT = "test"
ID = "case_id"  # the image file name without _0000.nii.gz, e.g. quiz_0_041
COLUMNS = (ID, "split", "subtype", "image", "mask")
IMAGE_SUFFIX = "_0000.nii.gz"
MASK_SUFFIX = ".nii.gz"
_SUBTYPE_DIR = re.compile(r"^subtype(\d+)$")
_CASE = re.compile(r"^quiz_[0-9A-Za-z_]+$")


def image_name(case_id: str) -> str:
    return case_id + IMAGE_SUFFIX


def mask_name(case_id: str) -> str:
    return case_id + MASK_SUFFIX


def case_of_image(path: Path) -> str | None:
    """``quiz_0_041_0000.nii.gz`` -> ``quiz_0_041``; None for any other name."""
    if not path.name.endswith(IMAGE_SUFFIX):
        return None
    case = path.name[: -len(IMAGE_SUFFIX)]
    return case if _CASE.match(case) else None


def _labelled_split(root: Path, split: str) -> list[tuple[str, str, int, str, str]]:
    """Rows of one labelled split: every ``subtype<k>/`` folder, images paired with masks."""
    folder = root / split
    if not folder.is_dir():
        raise InputError(f"{folder} not found: data_dir must hold {split}/subtype<k>/")
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _SUBTYPE_DIR.match(sub.name)
        if match is None:
            log.warning("skipping %s: not a subtype<k> folder", sub)
            continue
        for path in sorted(sub.iterdir()):
            if path.name.endswith(IMAGE_SUFFIX):
                case = case_of_image(path)
                mask = sub / mask_name(case) if case else None
                if case is None:
                    log.warning("skipping %s: not named quiz_<...>%s", path, IMAGE_SUFFIX)
                elif not mask.is_file():
                    log.warning("skipping %s: no mask %s", path, mask.name)
                else:
                    rows.append((case, split, int(match.group(1)), str(path), str(mask)))
            elif not (sub / (path.name[: -len(MASK_SUFFIX)] + IMAGE_SUFFIX)).is_file():
                log.warning("skipping %s: no image *%s beside it", path, IMAGE_SUFFIX)
    return rows


def _test_split(root: Path) -> list[tuple[str, str, int, str, str]]:
    folder = root / TEST_SPLIT
    rows = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        case = case_of_image(path)
        if case is None:
            log.warning("skipping %s: not named quiz_<id>%s", path, IMAGE_SUFFIX)
            continue
        rows.append((case, TEST_SPLIT, -1, str(path), ""))
    return rows


def scan(root: Path, with_test: bool = True) -> pd.DataFrame:
    """Rows (``COLUMNS``) of every case of ``root``; test cases have subtype -1 and no mask.

    A case id seen twice (e.g. the same file in two subtype folders) keeps its first row and
    the others are logged and skipped: nnU-Net case ids must be unique.
    """
    rows = [r for split in LABELLED_SPLITS for r in _labelled_split(Path(root), split)]
    if with_test:
        rows += _test_split(Path(root))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    dup = table[ID].duplicated()
    for row in table[dup].itertuples(index=False):
        log.warning("skipping %s: case id %s seen before", row.image, row.case_id)
    return table[~dup].reset_index(drop=True)


# ---- products: the case-label CSV beside dataset.json, prediction runs ------------------------
def nnunet_case_labels(cfg: Mapping[str, Any]) -> Path:
    """Per-case class labels of a multi-task dataset (``nnunet.trainer_options.case_labels``).

    Beside ``dataset.json`` in the raw dataset: our trainers read it there by case id.
    """
    return paths.nnunet_raw_dataset(cfg) / cfg["nnunet"]["trainer_options"]["case_labels"]


def predictions_dir(cfg: Mapping[str, Any], name: str) -> Path:
    """``<pipeline>/predictions/<name>/``: one prediction run (masks + per-case CSVs)."""
    return paths.pipeline_dir(cfg) / "predictions" / name
