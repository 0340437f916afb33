"""Pancreas fixtures: the tiny synthetic quiz set converted, with its folds and splits_final.json."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import ROOT, preprocess
from utils import paths
from utils.config import load_config
from utils.fold_split import main as folds_main
from utils.pancreas.synthetic import generate

CFG = ROOT / "config" / "pancreas" / "base.yaml"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(overrides, config) of the tiny synthetic set converted, with folds and splits_final.json."""
    root = tmp_path_factory.mktemp("pancreas")
    generate(root / "data", "tiny", seed=0)
    overrides = [
        "profile=tiny",
        f"data_dir={root / 'data'}",
        f"output_dir={root / 'out'}",
        "device=cpu",
    ]
    cfg = load_config(CFG, overrides)
    logging.disable(logging.INFO)
    try:
        preprocess("pancreas", *overrides)
        splits = str(paths.nnunet_splits(cfg))
        folds_main(["--CFG", str(CFG), "--nnunet-splits", splits, *overrides])
    finally:
        logging.disable(logging.NOTSET)
    return overrides, cfg
