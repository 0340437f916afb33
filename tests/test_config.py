"""Config loading, strict overrides, profiles, registries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from utils.checkpoint import resume_state, save_checkpoint
from utils.config import ConfigError, diff_configs, load_config, save_config, yaml_load
from utils.ensemble import members_of
from utils.errors import InputError
from utils.registry import DATASETS, LOSSES, MODELS, build_model, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p for p in (ROOT / "config").glob("*/*.yaml") if p.name != "base.yaml")
BASES = sorted((ROOT / "config").glob("**/base.yaml"))
RSNA_BASE = ROOT / "config" / "rsna" / "base.yaml"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: f"{p.parent.name}/{p.stem}")
@pytest.mark.parametrize("profile", ["full", "demo", "tiny"])
def test_every_config_loads_and_names_registered_components(path, profile):
    cfg = load_config(path, [f"profile={profile}"])
    assert cfg.exp_name == path.stem and cfg.pipeline == path.parent.name
    load_pipeline(cfg.pipeline)
    if cfg.ensemble:  # an ensemble of trained experiments names no component of its own
        assert len(members_of(cfg)) >= 2
        return
    assert cfg.model.name in MODELS.names()
    assert cfg.dataset.name in DATASETS.names()
    assert cfg.loss.name in LOSSES.names()


@pytest.mark.parametrize("path", BASES, ids=lambda p: str(p.relative_to(ROOT / "config")))
def test_base_keys_are_all_commented(path):
    """Every key line of a base file carries a comment (the defaults files are the documentation).

    The profile blocks at the end only repeat keys declared (and commented) above them.
    """
    head, profiles = path.read_text().split("\nprofiles:", 1)
    for line in [*head.splitlines(), "profiles:" + profiles.splitlines()[0]]:
        stripped = line.strip()
        if (
            stripped
            and not stripped.startswith("#")
            and ":" in stripped
            and not stripped.startswith("-")
            and not line.startswith("infer:")  # re-opens the generic section to add a key
        ):
            assert "#" in line, f"uncommented key in {path.name}: {line!r}"


def test_generic_base_holds_no_rsna_key():
    generic = yaml_load((ROOT / "config" / "base.yaml").read_text())
    rsna = yaml_load(RSNA_BASE.read_text())
    rsna_only = {k for k in rsna if k not in generic and k != "profiles"}
    assert {"cache", "localize", "stages"} <= rsna_only
    assert generic["data_dir"] is None and "viz_studies" not in generic["infer"]


def test_a_pipeline_refuses_another_pipelines_keys(tmp_path):
    """A HipMRI-like pipeline cannot set RSNA's localize.* (in its stage file or on the command line)."""
    (tmp_path / "hip").mkdir()
    (tmp_path / "hip" / "base.yaml").write_text("data_dir: data/hip   # slices\n")
    stage = tmp_path / "hip" / "unet.yaml"
    stage.write_text("localize:\n  vert_thresh: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'localize'.*valid keys: data_dir"):
        load_config(stage)
    stage.write_text("train:\n  epochs: 3\n")
    assert load_config(stage).pipeline == "hip"
    with pytest.raises(ConfigError, match="unknown config key 'localize.vert_thresh'"):
        load_config(stage, ["localize.vert_thresh=0.1"])
    assert load_config(RSNA_BASE, ["localize.vert_thresh=0.1"]).localize.vert_thresh == 0.1


def test_override_types_and_logging(caplog):
    with caplog.at_level(logging.INFO, logger="utils.config"):
        cfg = load_config(
            ROOT / "config/rsna/stage1_vertebra.yaml",
            [
                "train.lr=1e-4",
                "train.stop_after=null",
                "cache.window=[40, 400]",
                "model.params.encoder.backbone=resnet34",
            ],
        )
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.stop_after is None
    assert cfg.cache.window == (40, 400)
    assert cfg.model.params.encoder.backbone == "resnet34"
    assert "override train.lr: 0.0002 -> 0.0001" in caplog.text


def test_a_switch_takes_true_or_false_only():
    """``replace(**{"post.match_prior": "false"})`` once left prior matching on (a non-empty
    string is truthy); the CLI parses ``false`` as YAML, ``replace`` must be given the bool."""
    cfg = load_config(RSNA_BASE, ["post.match_prior=false"])
    assert cfg.post.match_prior is False
    assert cfg.replace(**{"post.match_prior": True}).post.match_prior is True
    with pytest.raises(ConfigError, match="'post.match_prior' .* is true or false, got 'false'"):
        cfg.replace(**{"post.match_prior": "false"})


def test_unknown_override_key_names_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "config/rsna/stage1_vertebra.yaml", ["train.lrr=1"])
    assert (
        "train.lrr" in str(err.value) and "batch_size" in str(err.value) and "lr" in str(err.value)
    )
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(RSNA_BASE, ["train.lr"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(RSNA_BASE, ["train=3"])


def test_unknown_key_in_stage_file_and_unknown_profile(tmp_path):
    (tmp_path / "rsna").mkdir()
    (tmp_path / "rsna" / "base.yaml").write_text(RSNA_BASE.read_text())
    bad = tmp_path / "rsna" / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz' in .*bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown profile 'fast'; available: demo, full, tiny"):
        load_config(RSNA_BASE, ["profile=fast"])
    with pytest.raises(ConfigError, match="config/<pipeline>/"):
        load_config(tmp_path / "bad.yaml")


def test_profile_then_override_order():
    cfg = load_config(ROOT / "config/rsna/stage2_fracture.yaml", ["profile=demo", "train.epochs=2"])
    assert cfg.train.epochs == 2 and cfg.dataset.params.image_size == 80 and cfg.n_folds == 3


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "config/rsna/stage2_fracture.yaml")
    with pytest.raises(TypeError):
        cfg.seed = 1
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml_load((tmp_path / "config.yaml").read_text()) == cfg.to_dict()
    other = cfg.replace(**{"train.lr": 1.0, "num_workers": 7})
    assert diff_configs(cfg, other) == ["train.lr"]  # num_workers is a runtime key


def test_registry_errors_list_choices():
    with pytest.raises(
        ConfigError,
        match="unknown model 'resnet'; valid: .*fracture_seq, .*patient_head, .*vertebra_bbox_ratio",
    ):
        MODELS.get("resnet")
    cfg = load_config(ROOT / "config/rsna/stage1_vertebra.yaml", ["model.params.dropuot=0.5"])
    with pytest.raises(
        ConfigError, match="unknown params \\['dropuot'\\]; valid: encoder, in_chans"
    ):
        build_model(cfg)


@pytest.mark.parametrize(
    "change, refused",
    [
        ("nnunet.n_proc=3", False),  # a worker count (tiny: 1)
        ("report.threshold=0.3", False),  # the report, after training
        ("num_workers=4", False),
        ("tracker.name=tensorboard", False),
        ("train.grad_checkpointing=true", False),  # the same gradients in less memory
        ("train.max_train_batches=2", True),  # a capped epoch trains other weights
        ("train.lr=1.0e-2", True),  # what the run computes
        ("prep.max_side=64", True),  # the classifier's input images
    ],
)
def test_resume_is_refused_only_over_keys_that_change_the_run(tmp_path, change, refused):
    """A FracAtlas classifier fold trained with one config, resumed with one key changed."""
    stage = ROOT / "config" / "fracatlas" / "classifier.yaml"
    ov = ["profile=tiny", f"output_dir={tmp_path}"]
    run = tmp_path / "fold0"
    save_checkpoint({"config": load_config(stage, ov).to_dict(), "epoch": 0}, run / "last.pth")
    cfg = load_config(stage, [*ov, change])
    if refused:
        with pytest.raises(InputError, match=f"different config \\({change.split('=')[0]}\\)"):
            resume_state(cfg, run)
    else:
        assert resume_state(cfg, run)["epoch"] == 0
