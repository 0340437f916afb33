"""FracAtlas -> nnU-Net v2 raw dataset + ``cases.csv``.

``python -m utils.preprocess_data --pipeline fracatlas --data-dir D [--out-dir O] [key=value ...]``

``O`` (default ``<output_dir>/fracatlas/nnunet/raw/Dataset<id>_FracAtlas``, where the recipe looks)::

    imagesTr/<case>_0000.png  labelsTr/<case>.png      nnU-Net's training cases
    imagesTs/<case>_0000.png  labelsTs/<case>.png      test: the official test split + prep.test_negatives
    imagesExtra/, labelsExtra/                         other training-pool images (classifier only)
    dataset.json  cases.csv  conversion.json

Per image: the JPG decoded to single-channel 8-bit (a truncated file is decoded as far as it
goes, ``status`` truncated_recovered; an undecodable one is skipped, ``status`` unreadable);
every COCO polygon of the image rasterised with pycocotools at the image's own size and unioned
into one 0/1 mask; optionally both resized identically, aspect kept (``prep.max_side``); PNGs
written losslessly. Label rule (documented in docs/fracatlas.md): the majority of the three
sources -- the folder, ``dataset.csv`` and "has COCO polygons" -- with the folder deciding a
tie (a source that is missing does not vote); every disagreement is logged and noted in the
``conflict`` column. A fractured image without polygons has no mask: classifier only.

The conversion is rebuilt in a hidden folder and swapped in at the end, so ``O`` is either the
previous complete conversion or the new one; a rerun with the same inputs and settings is
skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from utils import paths
from utils.config import Config
from utils.errors import InputError
from utils.fracatlas import layout
from utils.fracatlas.images import UNREADABLE, UnreadableImage, rasterise, read_gray, resize_pair
from utils.io import changed_files, file_sizes, write_csv, write_text

log = logging.getLogger(__name__)
CONFIG = Path(__file__).resolve().parents[2] / "config" / "fracatlas" / "base.yaml"
CASE = "case_id"  # nnU-Net case identifier: the file stem with anything but [A-Za-z0-9] as _
COLUMNS = (
    CASE,
    layout.ID,
    "width",
    "height",
    "fractured",
    "n_instances",
    "split",
    "status",
    "nnunet_train",
    "image",
    "label",
    "conflict",
)
FOLDER_OF = {"train": "Tr", "test": "Ts", "extra": "Extra"}  # role -> images<X>/ labels<X>/
SIZES = "files.json"  # byte size of every converted file, written by the conversion


def cases_csv(out: Path) -> Path:
    return Path(out) / "cases.csv"


def share(image_id: str, seed: int, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by the image id (independent of file order or count)."""
    digest = hashlib.sha1(f"{seed}:{purpose}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def resolve_label(folder: int, csv: int | None, n_instances: int) -> tuple[int, str]:
    """(fractured 0/1, conflict note) by the majority of folder, dataset.csv and COCO polygons.

    ``csv`` None: dataset.csv has no row for the image (it does not vote); a 1-1 tie goes to the
    folder. The note is empty when the sources agree.
    """
    votes = {"folder": folder, "coco": int(n_instances > 0)}
    if csv is not None:
        votes["dataset.csv"] = int(csv)
    ones = sum(votes.values())
    label = folder if ones * 2 == len(votes) else int(ones * 2 > len(votes))
    if len(set(votes.values())) == 1:
        return label, ""
    return label, " ".join(f"{k}={v}" for k, v in votes.items()) + f" -> {label}"


def case_ids(image_ids: pd.Series) -> pd.Series:
    """nnU-Net case ids from file names (``IMG0000019.jpg`` -> ``IMG0000019``), unique."""
    stems = image_ids.map(lambda s: Path(s).stem).str.replace(r"[^A-Za-z0-9]+", "_", regex=True)
    stems = stems.where(stems != "", "case")
    dup = stems.groupby(stems).cumcount()
    return stems.where(dup == 0, stems + "_" + dup.astype(str))


def plan_cases(data: Path, cfg: Config) -> tuple[pd.DataFrame, dict[str, list]]:
    """One row per image file of ``data`` with labels, roles and sources; the polygons by image_id."""
    images = layout.scan_images(data)
    labels = layout.read_dataset_csv(data)
    coco = layout.read_coco(data)
    official = layout.read_splits(data)
    on_disk = set(images[layout.ID])
    for what, names in (
        ("dataset.csv rows", set(labels[layout.ID])),
        ("COCO images", set(coco.sizes)),
        ("split-file entries", set(official)),
    ):
        absent = sorted(names - on_disk)
        if absent:
            log.warning(
                "%d %s have no image file (e.g. %s): ignored",
                len(absent),
                what,
                ", ".join(absent[:3]),
            )
    csv_label = dict(zip(labels[layout.ID], labels["fractured"], strict=True))
    prep = cfg.prep
    rows = []
    for row in images.itertuples(index=False):
        image_id = row.image_id
        n_inst = len(coco.segmentations.get(image_id, []))
        csv = csv_label.get(image_id)
        fractured, conflict = resolve_label(
            row.folder_label, None if pd.isna(csv) else int(csv), n_inst
        )
        if conflict:
            log.warning("label conflict %s: %s", row.path, conflict)
        if fractured:
            test = official.get(image_id) == "test"
        else:
            test = share(image_id, cfg.seed, "test") < prep.test_negatives
        rows.append(
            {
                layout.ID: image_id,
                "path": row.path,
                "fractured": fractured,
                "n_instances": n_inst if fractured else 0,
                "split": "test" if test else "train",
                "conflict": conflict,
                "has_mask": bool(n_inst) or not fractured,
                "negative_pick": share(image_id, cfg.seed, "negatives") < prep.negatives,
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        raise InputError(f"no image files under {data / 'images'}")
    table.insert(0, CASE, case_ids(table[layout.ID]))
    train_pool = table["split"] == "train"
    table["nnunet_train"] = (
        train_pool & table["has_mask"] & (table["fractured"].astype(bool) | table["negative_pick"])
    ).astype(int)
    role = np.where(
        table["split"] == "test", "test", np.where(table["nnunet_train"] == 1, "train", "extra")
    )
    table["image"] = [
        f"images{FOLDER_OF[r]}/{c}_0000.png" for r, c in zip(role, table[CASE], strict=True)
    ]
    table["label"] = [
        f"labels{FOLDER_OF[r]}/{c}.png" if m else ""
        for r, c, m in zip(role, table[CASE], table["has_mask"], strict=True)
    ]
    for row in table[table["fractured"].astype(bool) & ~table["has_mask"]].itertuples():
        log.warning("%s: fractured without COCO polygons: no mask, classifier only", row.path)
    segs = {k: coco.segmentations[k] for k in coco.segmentations if k in on_disk}
    return table, segs


def convert_image(row, segs: list, out: Path, max_side: int | None) -> dict:
    """Write one case's PNG image (and mask); returns width, height, status."""
    image, status = read_gray(row.path)
    h, w = image.shape
    mask = rasterise(segs, h, w) if row.fractured else np.zeros((h, w), np.uint8)
    image, mask = resize_pair(image, mask, max_side)
    cv2.imwrite(str(out / row.image), image)
    if row.label:
        cv2.imwrite(str(out / row.label), mask)
    return {"width": w, "height": h, "status": status}


def settings(data: Path, cfg: Config) -> dict:
    """What a conversion depends on: the inputs' sizes and times, and the prep settings."""
    files = [layout.dataset_csv(data), layout.coco_json(data)]
    files += [layout.split_csv(data, n) for n in layout.SPLIT_NAMES]
    images = sorted(layout.image_dir(data, f) for f in layout.FOLDERS)
    stamp = [
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else (str(p), None, None)
        for p in [*files, *images]
    ]
    return {
        "data": str(data.resolve()),
        "inputs": stamp,
        "prep": cfg.prep.to_dict(),
        "seed": cfg.seed,
    }


def write_dataset_json(folder: Path, name: str, n_training: int) -> None:
    """nnU-Net's ``dataset.json`` (one z-scored channel, labels background / fracture, PNG)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        str(folder),
        channel_names={0: "zscore"},
        labels={"background": 0, "fracture": 1},
        num_training_cases=n_training,
        file_ending=".png",
        dataset_name=name,
        description="FracAtlas fracture masks (COCO polygons rasterised with pycocotools)",
        license="CC BY 4.0 (FracAtlas, doi 10.6084/m9.figshare.22363012)",
        converted_by="python -m utils.preprocess_data --pipeline fracatlas",
        reference="Abedeen et al., Scientific Data 10:521 (2023)",
    )


def convert(data: Path, out: Path, cfg: Config) -> pd.DataFrame:
    """Convert ``data`` into ``out`` (replaced atomically); returns the cases table."""
    table, segs = plan_cases(data, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for x in FOLDER_OF.values():
            (tmp / f"images{x}").mkdir()
            (tmp / f"labels{x}").mkdir()
        done = []
        for row in tqdm(table.itertuples(index=False), total=len(table), desc="convert"):
            try:
                done.append(convert_image(row, segs.get(row.image_id, []), tmp, cfg.prep.max_side))
            except UnreadableImage as err:
                log.warning("skipping %s: unreadable (%s)", row.path, err)
                done.append({"width": 0, "height": 0, "status": UNREADABLE})
        table = table.assign(**pd.DataFrame(done).to_dict("series"))
        for row in table[table["status"] == UNREADABLE].itertuples():
            table.loc[row.Index, ["image", "label", "nnunet_train"]] = ["", "", 0]
        for row in table[table["status"] == "truncated_recovered"].itertuples():
            log.warning("%s is truncated: decoded as far as it goes", row.path)
        table = table[list(COLUMNS)]
        write_dataset_json(tmp, out.name, int(table["nnunet_train"].sum()))
        write_csv(table, cases_csv(tmp))
        write_text(json.dumps(settings(data, cfg), indent=1) + "\n", tmp / "conversion.json")
        write_text(json.dumps(file_sizes(tmp), indent=0) + "\n", tmp / SIZES)
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return table


def _swap(new: Path, out: Path) -> None:
    """Put the folder ``new`` in place of ``out`` (the old one is removed after the move)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_current(data: Path, out: Path, cfg: Config) -> bool:
    """True when ``out`` was converted from ``data`` with these settings and no file of it has
    been damaged since (each file's size is checked against the record the conversion wrote)."""
    done, sizes = out / "conversion.json", out / SIZES
    if not (cases_csv(out).is_file() and done.is_file() and sizes.is_file()):
        return False
    if json.loads(done.read_text()) != json.loads(json.dumps(settings(data, cfg))):
        return False
    damaged = changed_files(out, json.loads(sizes.read_text()))
    if damaged:
        log.warning(
            "%s: %d converted files missing or damaged (e.g. %s): converting again",
            out,
            len(damaged),
            damaged[0],
        )
    return not damaged


def summary(table: pd.DataFrame) -> str:
    ok = table[table["status"] != UNREADABLE]
    return (
        f"{len(table)} images ({int(ok['fractured'].sum())} fractured, "
        f"{int(ok['n_instances'].sum())} instances); nnU-Net train {int(ok['nnunet_train'].sum())}, "
        f"test {int((ok['split'] == 'test').sum())}; truncated {int((table['status'] == 'truncated_recovered').sum())}, "
        f"unreadable {int((table['status'] == UNREADABLE).sum())}, conflicts {int((table['conflict'] != '').sum())}"
    )


def run(cfg, workers: int = 1) -> str:
    """The pipeline's conversion -> the nnU-Net raw dataset (skipped when current; one process)."""
    data, out = paths.data_dir(cfg), paths.nnunet_raw_dataset(cfg)
    if is_current(data, out, cfg):
        return f"{out} is current (same inputs and prep settings): skipped"
    try:
        table = convert(data, out, cfg)
    except json.JSONDecodeError as err:
        raise InputError(f"{layout.coco_json(data)}: not valid JSON ({err})") from None
    return f"wrote {out}: {summary(table)}"
