"""FracAtlas nnU-Net stage around the stock CLI: ``python -m utils.fracatlas.segment --CFG config/fracatlas/base.yaml STEP [key=value ...]``.

Steps (train.sh runs them in this order, with ``python -m utils.nnunet ... plan`` / ``train``
between ``splits`` and ``oof``):

- ``splits``: nnU-Net's ``splits_final.json`` from the pipeline's fold file, restricted to the
  nnU-Net training cases (fold k's ``val`` = its fractured images + its share of negatives).
- ``oof``: each fold's model predicts every training-pool image of its own fold (fractured,
  negatives and classifier-only images alike) with ``nnUNetv2_predict -f k --save_probabilities``;
  ``nnUNetv2_evaluate_simple`` scores the labelled ones; the fracture probability of each image
  is kept as a uint8 PNG map (``<output_dir>/fracatlas/maps_oof/<case>.png``).
- ``test``: the fold ensemble on ``imagesTs`` (maps in ``maps_test/``), scored on ``labelsTs``.

Predictions are reused while their evaluation file is newer than every fold's final checkpoint
and ``cases.csv``; otherwise they are redone from scratch.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from utils import cli, nnunet, paths
from utils.config import Config
from utils.errors import InputError
from utils.folds import load_folds, with_folds, write_nnunet_splits
from utils.fracatlas import layout
from utils.fracatlas.folds import read_cases
from utils.fracatlas.layout import ID
from utils.fracatlas.preprocess import CASE, cases_csv
from utils.io import atomic_path, write_text

log = logging.getLogger(__name__)


def write_splits(cfg: Config) -> Path:
    """``splits_final.json`` (nnU-Net's preprocessed folder) = the fold file on nnU-Net's cases."""
    folds = load_folds(paths.folds_csv(cfg), ID)
    cases = read_cases(cfg)
    train = cases[cases["nnunet_train"] == 1]
    return write_nnunet_splits(
        folds, paths.nnunet_splits(cfg), dict(zip(train[ID], train[CASE], strict=True))
    )


def _link_folder(folder: Path, files: dict[str, Path]) -> Path:
    """A fresh ``folder`` of symlinks name -> file (nnU-Net reads whole folders)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, target in files.items():
        (folder / name).symlink_to(Path(target).resolve())
    return folder


def split_cases(cfg: Config, split: str) -> pd.DataFrame:
    """Readable cases of ``oof`` (training pool, with ``fold``) or ``test``."""
    cases = read_cases(cfg)
    if split == "test":
        return cases[cases["split"] == "test"].reset_index(drop=True)
    pool = cases[cases["split"] == "train"]
    return with_folds(pool, load_folds(paths.folds_csv(cfg), ID), ID)


def is_current(cfg: Config, split: str) -> bool:
    summary = layout.seg_summary(cfg, split)
    sources = [cases_csv(paths.nnunet_raw_dataset(cfg))]
    sources += [nnunet.fold_dir(cfg, k) / "checkpoint_final.pth" for k in nnunet.folds(cfg)]
    return summary.is_file() and all(
        s.is_file() and s.stat().st_mtime < summary.stat().st_mtime for s in sources
    )


def predict(cfg: Config, split: str) -> pd.DataFrame:
    """Masks + probabilities of ``split`` into ``layout.seg_predictions`` (see module docstring)."""
    cases = split_cases(cfg, split)
    raw, out = paths.nnunet_raw_dataset(cfg), layout.seg_predictions(cfg, split)
    missing = [
        k
        for k in nnunet.folds(cfg)
        if not (nnunet.fold_dir(cfg, k) / "checkpoint_final.pth").is_file()
    ]
    if missing:
        raise InputError(f"nnU-Net folds {missing} are not trained ({paths.nnunet_model_dir(cfg)})")
    shutil.rmtree(out, ignore_errors=True)
    env = nnunet.environment(cfg)
    groups = cases.groupby("fold") if split == "oof" else [(None, cases)]
    for fold, group in groups:
        inputs = {
            f"{c}_0000.png": raw / img for c, img in zip(group[CASE], group["image"], strict=True)
        }
        tag = f"fold_{fold}" if fold is not None else "test"
        src = _link_folder(out.parent / f".inputs_{split}" / tag, inputs)
        use = [int(fold)] if fold is not None else None
        nnunet.run(nnunet.predict_command(cfg, src, out, use_folds=use, probabilities=True), env)
        shutil.rmtree(src)
    return cases


def write_maps(cases: pd.DataFrame, predictions: Path, maps: Path) -> None:
    """Fracture probability (class 1 of each ``<case>.npz``) -> ``maps/<case>.png``, uint8 x 255."""
    maps.mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases[CASE], desc="maps", leave=False):
        probs = np.load(predictions / f"{case}.npz")["probabilities"]  # (2, 1, H, W)
        fracture = np.rint(np.clip(probs[1, 0], 0, 1) * 255).astype(np.uint8)
        with atomic_path(maps / f"{case}.png") as tmp:
            tmp.write_bytes(cv2.imencode(".png", fracture)[1].tobytes())


def evaluate(cfg: Config, cases: pd.DataFrame, split: str) -> Path:
    """``nnUNetv2_evaluate_simple`` on the cases with a label -> ``layout.seg_summary``."""
    raw, out = paths.nnunet_raw_dataset(cfg), layout.seg_predictions(cfg, split)
    scored = cases[cases["label"] != ""]
    base = out.parent / f".eval_{split}"
    gt = _link_folder(
        base / "gt",
        {f"{c}.png": raw / lab for c, lab in zip(scored[CASE], scored["label"], strict=True)},
    )
    pred = _link_folder(base / "pred", {f"{c}.png": out / f"{c}.png" for c in scored[CASE]})
    result = base / "summary.json"
    cmd = ["nnUNetv2_evaluate_simple", str(gt), str(pred), "-l", "1", "-o", str(result)]
    nnunet.run([*cmd, "-np", str(cfg.nnunet.n_proc)], nnunet.environment(cfg))
    summary = write_text(result.read_text(), layout.seg_summary(cfg, split))
    shutil.rmtree(base)
    return summary


def run_split(cfg: Config, split: str) -> Path:
    if is_current(cfg, split):
        print(f"{layout.seg_summary(cfg, split)} is newer than the models: predictions reused")
        return layout.seg_summary(cfg, split)
    cases = predict(cfg, split)
    write_maps(cases, layout.seg_predictions(cfg, split), layout.seg_maps(cfg, split))
    summary = evaluate(cfg, cases, split)
    print(f"nnU-Net {split}: {len(cases)} images predicted, evaluation {summary}")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg="config/fracatlas/base.yaml", overrides=False)
    parser.add_argument("step", choices=["splits", "oof", "test"])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    with cli.running():
        cfg = cli.load(args)
        if args.step == "splits":
            print(f"wrote {write_splits(cfg)}")
        else:
            run_split(cfg, args.step)


if __name__ == "__main__":
    main()
