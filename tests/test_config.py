"""Config loading, strict overrides, profiles, registries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from models import MODELS, build_model
from utils.config import ConfigError, diff_configs, load_config, save_config, yaml_load
from utils.datasets import DATASETS
from utils.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p for p in (ROOT / "config").glob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.stem)
@pytest.mark.parametrize("profile", ["full", "demo", "tiny"])
def test_every_config_loads_and_names_registered_components(path, profile):
    cfg = load_config(path, [f"profile={profile}"])
    assert cfg.exp_name == path.stem
    assert cfg.model.name in MODELS.names()
    assert cfg.dataset.name in DATASETS.names()
    assert cfg.loss.name in LOSSES.names()


def test_base_keys_are_all_commented():
    """Every key line of base.yaml carries a comment (the defaults file is the documentation).

    The profile blocks at the end only repeat keys declared (and commented) above them.
    """
    head, profiles = (ROOT / "config" / "base.yaml").read_text().split("\nprofiles:", 1)
    for line in [*head.splitlines(), "profiles:" + profiles.splitlines()[0]]:
        stripped = line.strip()
        if (
            stripped
            and not stripped.startswith("#")
            and ":" in stripped
            and not stripped.startswith("-")
        ):
            assert "#" in line, f"uncommented key in base.yaml: {line!r}"


def test_override_types_and_logging(caplog):
    with caplog.at_level(logging.INFO, logger="utils.config"):
        cfg = load_config(
            ROOT / "config/stage1_vertebra.yaml",
            [
                "train.lr=1e-4",
                "train.stop_after=null",
                "cache.window=[40, 400]",
                "model.params.backbone=resnet34",
            ],
        )
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.stop_after is None
    assert cfg.cache.window == (40, 400)
    assert cfg.model.params.backbone == "resnet34"
    assert "override train.lr: 0.0002 -> 0.0001" in caplog.text


def test_unknown_override_key_names_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "config/stage1_vertebra.yaml", ["train.lrr=1"])
    assert (
        "train.lrr" in str(err.value) and "batch_size" in str(err.value) and "lr" in str(err.value)
    )
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["train=3"])


def test_unknown_key_in_stage_file_and_unknown_profile(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz' in .*bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown profile 'fast'; available: demo, full, tiny"):
        load_config(None, ["profile=fast"])


def test_profile_then_override_order():
    cfg = load_config(ROOT / "config/stage2_fracture.yaml", ["profile=demo", "train.epochs=2"])
    assert cfg.train.epochs == 2 and cfg.dataset.params.image_size == 80 and cfg.n_folds == 3


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "config/stage2_fracture.yaml")
    with pytest.raises(TypeError):
        cfg.seed = 1
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml_load((tmp_path / "config.yaml").read_text()) == cfg.to_dict()
    other = cfg.replace(**{"train.lr": 1.0, "num_workers": 7})
    assert diff_configs(cfg, other) == ["train.lr"]  # num_workers is a runtime key


def test_registry_errors_list_choices():
    with pytest.raises(
        KeyError,
        match="unknown model 'resnet'; valid: fracture_seq, patient_head, vertebra_bbox_ratio",
    ):
        MODELS.get("resnet")
    cfg = load_config(ROOT / "config/stage1_vertebra.yaml", ["model.params.dropuot=0.5"])
    with pytest.raises(
        TypeError, match="unknown params \\['dropuot'\\]; valid: backbone, in_chans"
    ):
        build_model(cfg)
