"""Every registered model: forward shapes, finite outputs, in_chans reaching timm."""

from __future__ import annotations

import pytest
import torch

from models.encoder import create_encoder
from utils.engine import enable_grad_checkpointing
from utils.registry import MODELS, load_pipeline

load_pipeline("rsna")  # registers the models of every pipeline
load_pipeline("hipmri")
load_pipeline("fracatlas")

BATCHES = {
    "vertebra_bbox_ratio": lambda: {"image": torch.randn(2, 5, 64, 64), "z": torch.rand(2)},
    "fracture_seq": lambda: {"image": torch.randn(2, 4, 5, 48, 48)},
    "patient_head": lambda: {"logits": torch.randn(3, 7), "missing": torch.zeros(3, 7)},
    "hipmri_unet": lambda: {"image": torch.randn(2, 1, 64, 32)},
    "fracatlas_classifier": lambda: {"image": torch.randn(2, 2, 64, 64)},
}
PARAMS = {
    "vertebra_bbox_ratio": {"in_chans": 5},
    "fracture_seq": {"in_chans": 5, "hidden": 16},
    "patient_head": {},
    "hipmri_unet": {"features": [4, 8, 16], "n_conv": 1, "scale": 0.5},
    "fracatlas_classifier": {"in_chans": 2, "encoder": {"backbone": "resnet10t"}},
}
SHAPES = {
    "vertebra_bbox_ratio": {"box": (2, 4), "ratio_logits": (2, 7), "ratios": (2, 7)},
    "fracture_seq": {"logit": (2,), "attention": (2, 4), "embedding": (2, 32)},
    "patient_head": {"logits": (3, 8)},
    "hipmri_unet": {"logits": (2, 6, 64, 32)},
    "fracatlas_classifier": {"logits": (2,)},
}


def test_every_registered_model_is_covered():
    assert sorted(BATCHES) == MODELS.names()


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_forward_shapes_and_finite(name):
    torch.manual_seed(0)
    model = MODELS.build(name, PARAMS[name]).eval()
    with torch.no_grad():
        out = model(BATCHES[name]())
    assert {k: tuple(v.shape) for k, v in out.items()} == SHAPES[name]
    assert all(torch.isfinite(v).all() for v in out.values())


def test_in_chans_and_encoder_spec_reach_the_backbone():
    model = MODELS.build(
        "vertebra_bbox_ratio", {"in_chans": 7, "encoder": {"backbone": "resnet34"}}
    )
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 7
    assert len(model.encoder.layer1) == 3  # resnet34 (resnet18 has 2 blocks per stage)
    with pytest.raises(
        TypeError, match="encoder got unknown keys \\['bakbone'\\]; valid: backbone"
    ):
        MODELS.build("fracture_seq", {"encoder": {"bakbone": "resnet34"}})


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_encoder_global_pool_reduces_the_last_feature_map_as_named(pool):
    """A small local feature (a crack) survives max pooling; the width stays the backbone's."""
    encoder, width = create_encoder({"backbone": "resnet10t", "global_pool": pool}, 1)
    encoder.eval()
    image = torch.randn(2, 1, 64, 64)
    fmap = encoder.forward_features(image)  # (B, F, h, w)
    expected = {
        "avg": fmap.mean((2, 3)),
        "max": fmap.amax((2, 3)),
        "avgmax": 0.5 * (fmap.mean((2, 3)) + fmap.amax((2, 3))),
    }[pool]
    out = encoder(image)
    assert out.shape == (2, width)
    torch.testing.assert_close(out, expected)
    with pytest.raises(TypeError, match="global_pool must be one of"):
        create_encoder({"global_pool": "catavgmax"}, 1)


def test_grad_checkpointing_keeps_the_gradients():
    """``train.grad_checkpointing`` (a runtime key) recomputes the timm encoder's activations in
    the backward pass, replaying drop-path's random draws: a training step's gradients are those
    of the plain model."""
    params = {
        "in_chans": 3,
        "hidden": 8,
        "encoder": {"backbone": "convnext_atto", "drop_path_rate": 0.3},
    }
    x = {"image": torch.randn(2, 3, 3, 64, 64)}
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = MODELS.build("fracture_seq", params).train()
        if checkpointed:
            assert enable_grad_checkpointing(model) == 1  # the encoder, the one timm model
            assert all(stage.grad_checkpointing for stage in model.encoder.stages)
        torch.manual_seed(1)
        model(x)["logit"].sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)
    assert enable_grad_checkpointing(MODELS.build("patient_head", {})) == 0


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_sequence_model_under_bf16_autocast_and_backward(rnn):
    model = MODELS.build("fracture_seq", {"in_chans": 3, "hidden": 8, "rnn": rnn})
    x = {"image": torch.randn(2, 3, 3, 32, 32)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out["logit"].sum().backward()
    assert out["logit"].dtype == torch.float32
    assert torch.allclose(out["attention"].sum(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="rnn must be"):
        MODELS.build("fracture_seq", {"rnn": "transformer"})


def test_patient_head_starts_from_stage2_logits():
    head = MODELS.build("patient_head", {})
    logits = torch.tensor([[-3.0, 2.0, -3.0, -3.0, -3.0, -3.0, -3.0]])
    out = head.eval()({"logits": logits, "missing": torch.zeros(1, 7)})["logits"]
    assert torch.allclose(out[0, 1:], logits[0])  # zero-initialised correction
    assert out[0, 0] >= logits.max()  # patient_overall starts as a soft maximum
