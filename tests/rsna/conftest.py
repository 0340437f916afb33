"""RSNA fixtures: one tiny synthetic data set, preprocessed once per test session, and tiny
trained runs of every stage on it (trained once, on first use)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import ROOT, preprocess
from utils.config import load_config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The `tiny` preset of the synthetic generator (Kaggle layout)."""
    from utils.rsna.synthetic.generator import generate

    out = tmp_path_factory.mktemp("rsna_tiny") / "data"
    generate(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_output(tiny_data, tmp_path_factory) -> Path:
    """An output folder with rsna/prep/ (cache + tables) and rsna/folds.csv for the tiny data set."""
    from utils.fold_split import main as fold_main

    out = tmp_path_factory.mktemp("rsna_tiny_out")
    ov = tiny_overrides(tiny_data, out)
    logging.disable(logging.INFO)
    try:
        preprocess("rsna", *ov)
        fold_main(["--CFG", str(ROOT / "config" / "rsna" / "base.yaml"), *ov])
    finally:
        logging.disable(logging.NOTSET)
    return out


def tiny_overrides(data: Path, output: Path) -> list[str]:
    # post.calibration=platt: the tests follow the fitted calibration through report, chain and bundle
    return [
        "profile=tiny",
        f"data_dir={data}",
        f"output_dir={output}",
        "n_folds=2",
        "post.calibration=platt",
    ]


# Tiny models learn little in one epoch: accept (nearly) every slice as a vertebra so stage 2 has input.
LOCALIZE = ["localize.vert_thresh=0.001"]


@pytest.fixture(scope="session")
def tiny_ov(tiny_data, tiny_output) -> list[str]:
    """Overrides of the tiny trained runs."""
    return tiny_overrides(tiny_data, tiny_output) + LOCALIZE


@pytest.fixture(scope="session")
def tiny_stage1(tiny_ov):
    """Stage 1 trained on the tiny data (both folds) with its OOF predictions."""
    import inference
    import train

    train.main(["--CFG", "config/rsna/stage1_vertebra.yaml", *tiny_ov])
    inference.main(["--CFG", "config/rsna/stage1_vertebra.yaml", "--split", "oof", *tiny_ov])
    return load_config("config/rsna/stage1_vertebra.yaml", tiny_ov)


@pytest.fixture(scope="session")
def tiny_stage2(tiny_stage1, tiny_ov):
    """Stage 2 trained on the stage-1 OOF localisation, with its OOF predictions."""
    import inference
    import train
    from utils.rsna.localize import main as stage2_labels_main

    stage2_labels_main(["--CFG", "config/rsna/stage2_fracture.yaml", *tiny_ov])
    train.main(["--CFG", "config/rsna/stage2_fracture.yaml", *tiny_ov])
    inference.main(["--CFG", "config/rsna/stage2_fracture.yaml", "--split", "oof", *tiny_ov])
    return load_config("config/rsna/stage2_fracture.yaml", tiny_ov)


@pytest.fixture(scope="session")
def tiny_head(tiny_stage2, tiny_ov):
    """The patient head on the stage-2 OOF predictions: the whole chain is trained."""
    import inference
    import train

    train.main(["--CFG", "config/rsna/patient_head.yaml", *tiny_ov])
    inference.main(["--CFG", "config/rsna/patient_head.yaml", "--split", "oof", *tiny_ov])
    return load_config("config/rsna/patient_head.yaml", tiny_ov)


@pytest.fixture
def tiny_cfg(tiny_data, tiny_output):
    """``tiny_cfg("stage1_vertebra", "train.epochs=2")`` -> a resolved tiny-profile config."""

    def make(stage: str, *overrides: str):
        return load_config(
            ROOT / "config" / "rsna" / f"{stage}.yaml",
            [*tiny_overrides(tiny_data, tiny_output), *overrides],
        )

    return make
