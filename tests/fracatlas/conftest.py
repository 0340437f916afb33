"""FracAtlas fixtures: the tiny synthetic download converted, with its fold file."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import ROOT, preprocess
from utils.fold_split import main as folds_main
from utils.fracatlas.synthetic import generate

BASE = ROOT / "config" / "fracatlas" / "base.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny synthetic set converted (resized to 96 px) with its fold file: the overrides."""
    root = tmp_path_factory.mktemp("fracatlas")
    generate(root / "data", "tiny", seed=0)
    overrides = [f"data_dir={root / 'data'}", f"output_dir={root / 'out'}", "profile=tiny"]
    logging.disable(logging.WARNING)
    try:
        preprocess("fracatlas", *overrides)
        folds_main(["--CFG", str(BASE), *overrides])
    finally:
        logging.disable(logging.NOTSET)
    return overrides
