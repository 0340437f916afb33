"""HipMRI fixtures: the tiny synthetic slice set converted, with given-split folds and one trained epoch."""

from __future__ import annotations

import pytest

import train
from tests.conftest import ROOT, preprocess
from utils.fold_split import main as folds_main
from utils.hipmri.synthetic import generate

STAGE = ROOT / "config" / "hipmri" / "unet.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny synthetic set, converted, given-split folds, one trained epoch: (data, overrides)."""
    root = tmp_path_factory.mktemp("hipmri")
    data = root / "data"
    generate(data, preset="tiny", seed=0)
    ov = ["profile=tiny", f"data_dir={data}", f"output_dir={root / 'output'}"]
    preprocess("hipmri", *ov)
    folds_main(["--CFG", str(ROOT / "config" / "hipmri" / "base.yaml"), *ov])
    train.main(["--CFG", str(STAGE), "--fold", "0", *ov])
    return data, root / "output", ov
