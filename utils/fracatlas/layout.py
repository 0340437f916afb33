"""The FracAtlas download's layout and its readers (figshare ``FracAtlas.zip``, see docs/fracatlas.md).

::

    images/Fractured/<image_id>.jpg  images/Non_fractured/<image_id>.jpg
    Annotations/COCO JSON/COCO_fracture_masks.json     polygons of the fractured images only
    dataset.csv                                        image_id + 12 int columns (may start with a BOM)
    Utilities/Fracture Split/{train,valid,test}.csv    one column image_id (fractured images only)

Readers never assume contiguous COCO ids, a fixed number of rows or a particular file-name
pattern: images are matched by file name, annotations by their ``image_id`` field.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from utils import paths
from utils.errors import InputError

log = logging.getLogger(__name__)

ID = (
    "image_id"  # the image's file name, e.g. IMG0000019.jpg (as in dataset.csv and the split files)
)
FOLDERS = {"Fractured": 1, "Non_fractured": 0}  # images/<folder>/ -> label
CSV_COLUMNS = (
    ID,
    "hand",
    "leg",
    "hip",
    "shoulder",
    "mixed",
    "hardware",
    "multiscan",
    "fractured",
    "fracture_count",
    "frontal",
    "lateral",
    "oblique",
)
SPLIT_NAMES = ("train", "valid", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_dir(root: Path, folder: str) -> Path:
    return Path(root) / "images" / folder


def coco_json(root: Path) -> Path:
    return Path(root) / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json"


def dataset_csv(root: Path) -> Path:
    return Path(root) / "dataset.csv"


def split_csv(root: Path, name: str) -> Path:
    return Path(root) / "Utilities" / "Fracture Split" / f"{name}.csv"


def scan_images(root: Path) -> pd.DataFrame:
    """Every image file under ``images/{Fractured,Non_fractured}/``: ``image_id, path, folder_label``.

    A file name found in both folders keeps its first occurrence (Fractured) and the other is
    logged and skipped. Missing ``images/``: :class:`InputError`.
    """
    if not (Path(root) / "images").is_dir():
        raise InputError(f"{Path(root) / 'images'} not found: data_dir must hold images/")
    rows: dict[str, tuple[str, str, int]] = {}
    for folder, label in FOLDERS.items():
        for path in sorted(image_dir(root, folder).glob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                log.warning("skipping %s: not an image file", path)
                continue
            if path.name in rows:
                log.warning("skipping %s: %s is also in %s", path, path.name, rows[path.name][1])
                continue
            rows[path.name] = (path.name, str(path), label)
    return pd.DataFrame(list(rows.values()), columns=[ID, "path", "folder_label"])


def read_dataset_csv(root: Path) -> pd.DataFrame:
    """``dataset.csv`` (BOM tolerated) -> ``image_id, fractured`` (+ the other columns present).

    Missing file: an empty table (the folders and COCO still give labels); a file without
    ``image_id`` or ``fractured``: :class:`InputError`.
    """
    path = dataset_csv(root)
    if not path.is_file():
        log.warning("%s not found: labels come from the folders and the COCO file", path)
        return pd.DataFrame({ID: pd.Series(dtype=str), "fractured": pd.Series(dtype=int)})
    table = pd.read_csv(path, encoding="utf-8-sig", dtype={ID: str})
    table.columns = [str(c).strip() for c in table.columns]
    missing = {ID, "fractured"} - set(table.columns)
    if missing:
        raise InputError(f"{path}: missing columns {sorted(missing)} (has {list(table.columns)})")
    dup = table[ID].duplicated()
    if dup.any():
        log.warning("%s: %d duplicated image ids, keeping the first", path, int(dup.sum()))
        table = table[~dup]
    return table.reset_index(drop=True)


@dataclass
class Coco:
    """The COCO file indexed for lookups: file name -> (width, height) and -> segmentations."""

    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    segmentations: dict[str, list] = field(default_factory=lambda: defaultdict(list))


def read_coco(root: Path) -> Coco:
    """Index ``COCO_fracture_masks.json`` by image file name (ids need not be contiguous).

    Annotations of an unknown ``image_id`` are logged and skipped. Missing file: an empty index
    (no masks, every image is unlabelled for segmentation).
    """
    path = coco_json(root)
    coco = Coco()
    if not path.is_file():
        log.warning("%s not found: no fracture masks", path)
        return coco
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    names: dict[int, str] = {}
    for image in data.get("images", []):
        name = Path(str(image["file_name"])).name
        names[image["id"]] = name
        coco.sizes[name] = (int(image["width"]), int(image["height"]))
    for ann in data.get("annotations", []):
        name = names.get(ann.get("image_id"))
        if name is None:
            log.warning(
                "%s: annotation %s names unknown image_id %s: skipped",
                path,
                ann.get("id"),
                ann.get("image_id"),
            )
            continue
        if ann.get("segmentation"):
            coco.segmentations[name].append(ann["segmentation"])
    return coco


def read_splits(root: Path) -> dict[str, str]:
    """image_id -> ``train`` | ``valid`` | ``test`` from the split files present (none: empty)."""
    member: dict[str, str] = {}
    for name in SPLIT_NAMES:
        path = split_csv(root, name)
        if not path.is_file():
            log.warning("%s not found", path)
            continue
        table = pd.read_csv(path, encoding="utf-8-sig", dtype=str)
        column = ID if ID in table.columns else table.columns[0]
        for image_id in table[column].dropna().str.strip():
            member.setdefault(Path(image_id).name, name)
    return member


# ---- products: nnU-Net OOF / test predictions and maps (the guided classifier's 2nd channel), report
def seg_predictions(cfg: Mapping[str, Any], split: str) -> Path:
    """nnU-Net masks + probabilities of ``oof`` (each fold's model on its own fold) or ``test`` (fold ensemble)."""
    return paths.pipeline_dir(cfg) / "nnunet" / f"predictions_{split}"


def seg_summary(cfg: Mapping[str, Any], split: str) -> Path:
    """nnU-Net's evaluation (``summary.json``: Dice / IoU per case and mean) of ``oof`` or ``test``."""
    return paths.pipeline_dir(cfg) / "nnunet" / f"evaluation_{split}.json"


def seg_maps(cfg: Mapping[str, Any], split: str) -> Path:
    """Fracture probability maps (uint8 PNG, 255 = 1.0) per case: the mask-guided classifier's 2nd channel."""
    return paths.pipeline_dir(cfg) / f"maps_{split}"


def overlays_dir(cfg: Mapping[str, Any]) -> Path:
    return paths.pipeline_dir(cfg) / "overlays"


def roc_png(cfg: Mapping[str, Any]) -> Path:
    return paths.pipeline_dir(cfg) / "cv_roc.png"
