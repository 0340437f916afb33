"""Pretrained encoder weights (utils/weights.py, models/encoder.py): the local folder, the offline
pre-flight error before any run folder, checksums, the first conv adapted to in_chans, and
inference that never fetches. No test downloads: timm's download paths raise when touched."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from timm.models import _builder
from timm.models._manipulate import adapt_input_conv

import train
from models.encoder import EncoderSpec
from tests.conftest import ROOT, preprocess
from utils import paths, weights
from utils.checkpoint import save_checkpoint
from utils.config import load_config
from utils.errors import InputError
from utils.fold_split import main as folds_main
from utils.fracatlas.synthetic import generate
from utils.predict import load_models
from utils.registry import build_model

CLASSIFIER = ROOT / "config" / "fracatlas" / "classifier.yaml"
SMALL = "test_resnet"  # timm's smallest ResNet (first conv conv1.0, classifier fc)


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty weights folder, an empty Hugging Face cache, HF_HUB_OFFLINE and no timm download."""

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    folder = tmp_path / "weights"
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(_builder, "load_state_dict_from_hf", no_download)
    monkeypatch.setattr(_builder, "load_state_dict_from_url", no_download)
    return folder


def _saved(backbone: str = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random 'ImageNet' weights of ``backbone`` stored in the weights folder as fetch stores them."""
    torch.manual_seed(seed)
    state = timm.create_model(backbone, pretrained=False).state_dict()
    weights.store(backbone, state, source="test")
    return state


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_local_weights_load_bit_exactly_with_timms_first_conv(offline, in_chans):
    saved = _saved()
    encoder, width = EncoderSpec(backbone=SMALL, pretrained=True).build(in_chans)
    got = encoder.state_dict()
    assert width == encoder.num_features
    assert not any(k.startswith("fc.") for k in got)  # classifier dropped
    assert set(got) == {k for k in saved if not k.startswith("fc.")}
    for key, value in got.items():
        want = adapt_input_conv(in_chans, saved[key]) if key == "conv1.0.weight" else saved[key]
        assert torch.equal(value, want), key
    assert got["conv1.0.weight"].shape[1] == in_chans


def test_manifest_records_the_file_and_a_checksum_mismatch_is_one_line(offline):
    _saved()
    entry = weights.read_manifest()[SMALL]
    path = offline / entry["file"]
    assert entry["bytes"] == path.stat().st_size and entry["sha256"] == weights.sha256(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    for load in (
        lambda: EncoderSpec(backbone=SMALL, pretrained=True).build(3),
        lambda: weights.weights_source(EncoderSpec(backbone=SMALL, pretrained=True)),
    ):
        with pytest.raises(InputError, match=f"^{path}: sha256 differs") as err:
            load()
        assert "\n" not in str(err.value)


def test_network_decision_is_quick_and_honours_hf_hub_offline(offline, monkeypatch):
    weights.reachable.cache_clear()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert weights.reachable("127.0.0.1", server.getsockname()[1])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: the connect is refused
        assert not weights.reachable("127.0.0.1", closed.getsockname()[1])
    weights.reachable.cache_clear()
    assert weights.offline()  # the fixture set HF_HUB_OFFLINE=1
    monkeypatch.setattr(weights, "reachable", lambda host, port: pytest.fail("probed offline"))
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        weights.weights_source(EncoderSpec(backbone="resnet18", pretrained=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """The tiny synthetic FracAtlas set converted with its fold file: the overrides."""
    root = tmp_path_factory.mktemp("fracatlas")
    generate(root / "data", "tiny", seed=0)
    overrides = [f"data_dir={root / 'data'}", "profile=tiny", "device=cpu"]
    logging.disable(logging.WARNING)
    try:
        preprocess("fracatlas", *overrides, f"output_dir={root / 'out'}")
        base = ROOT / "config" / "fracatlas" / "base.yaml"
        folds_main(["--CFG", str(base), *overrides, f"output_dir={root / 'out'}"])
    finally:
        logging.disable(logging.NOTSET)
    return [*overrides, f"output_dir={root / 'out'}"]


def test_offline_without_weights_stops_before_any_run_folder(offline, tiny):
    argv = ["--CFG", str(CLASSIFIER), "--fold", "0", *tiny]
    argv += ["exp_name=pretrained_offline", "model.params.encoder.pretrained=true"]
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    message = str(err.value)
    assert message.startswith("error: no ImageNet weights of encoder 'resnet10t'")
    assert "\n" not in message
    for way_out in (
        "python -m utils.weights fetch --CFG",
        "model.params.encoder.checkpoint_path=FILE",
        "model.params.encoder.pretrained=false",
    ):
        assert way_out in message
    assert not paths.exp_dir(load_config(CLASSIFIER, argv[4:])).exists()

    # The same run with the backbone in the weights folder trains, offline.
    _saved("resnet10t")
    train.main(argv)
    last = paths.checkpoint_path(load_config(CLASSIFIER, argv[4:]), 0, "last")
    assert torch.load(last, weights_only=True)["config"]["model"]["params"]["encoder"]["pretrained"]


def test_load_models_never_fetches_pretrained_weights(offline, tmp_path, monkeypatch):
    cfg = load_config(
        CLASSIFIER,
        ["profile=tiny", f"output_dir={tmp_path}", "device=cpu",
         "model.params.encoder.pretrained=true",
         f"model.params.encoder.checkpoint_path={tmp_path / 'gone.pth'}"],
    )  # fmt: skip
    model = build_model(cfg.replace(**{"model.params.encoder.pretrained": False,
                                       "model.params.encoder.checkpoint_path": None}))  # fmt: skip
    state = {"model": model.state_dict(), "config": cfg.to_dict()}
    save_checkpoint(state, paths.checkpoint_path(cfg, 0, "best"))

    def no_pretrained(*args, **kwargs):
        raise AssertionError("inference loaded pretrained weights")

    monkeypatch.setattr(_builder, "load_pretrained", no_pretrained)
    loaded = load_models(cfg, [0])[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_full_profiles_are_pretrained_and_demo_and_tiny_are_not():
    found = weights.encoders_of(weights.stage_configs())
    assert set(found) == {"convnext_tiny", "resnet18"}
    assert {c for c, _ in found["resnet18"]} == {
        "fracatlas/classifier",
        "fracatlas/classifier_guided",
    }
    assert all(spec.pretrained for uses in found.values() for _, spec in uses)
    for profile in ("demo", "tiny"):
        scratch = weights.encoders_of(weights.stage_configs(), [f"profile={profile}"])
        assert not any(spec.pretrained for uses in scratch.values() for _, spec in uses)


def test_list_check_and_fetch_commands(offline, capsys, monkeypatch):
    weights.main(["list"])
    assert capsys.readouterr().out.splitlines()[:2] == [
        "resnet18 (fracatlas/classifier, fracatlas/classifier_guided): missing",
        "convnext_tiny (rsna/stage1_vertebra, rsna/stage2_fracture): missing",
    ]

    # fetch stores what timm's pretrained loading returns (here a randomly initialised model).
    create_model = timm.create_model

    def fake_create_model(name, pretrained):
        assert pretrained
        return create_model(name, pretrained=False)

    monkeypatch.setattr(weights, "reachable", lambda host, port: True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights.timm, "create_model", fake_create_model)
    weights.main(["fetch", "--CFG", str(CLASSIFIER)])
    assert capsys.readouterr().out.startswith(
        f"resnet18: fetched, {offline / 'resnet18.safetensors'}"
    )
    weights.main(["fetch", "--all", "profile=demo"])  # every demo encoder is resnet18
    assert capsys.readouterr().out.startswith("resnet18: present")

    weights.main(["check", "--pipeline", "fracatlas"])
    line = f"resnet18 (fracatlas/classifier, fracatlas/classifier_guided): local file {offline}"
    assert capsys.readouterr().out.startswith(line)
    weights.main(["check", "--pipeline", "rsna", "profile=demo"])
    assert capsys.readouterr().out == (
        "resnet18 (rsna/stage1_vertebra, rsna/stage2_fracture): not pretrained (trained from scratch)\n"
    )
    weights.main(["check", "--pipeline", "hipmri"])
    assert capsys.readouterr().out == "hipmri: no timm encoder in its stage configs\n"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="^error: no ImageNet weights of encoder 'convnext_tiny'"):
        weights.main(["check", "--pipeline", "rsna"])
