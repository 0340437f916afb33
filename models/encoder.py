"""timm image encoders shared by the models of every pipeline (offline-safe), from one spec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import timm
from torch import nn

from utils.weights import local_weights

# timm poolings that keep the feature width (catavgmax would double it).
POOLS = ("avg", "max", "avgmax")


@dataclass(frozen=True)
class EncoderSpec:
    """What a model's image encoder is: the ``model.params.encoder`` mapping of a config.

    ``pretrained`` loads timm's ImageNet weights: from the local weights folder when its manifest
    lists the backbone (``python -m utils.weights fetch``; no network), else downloaded by timm.
    ``checkpoint_path`` names a local timm weight file instead. Either way timm's pretrained
    loading adapts the first conv to ``in_chans`` and drops the classifier.
    """

    backbone: str = "resnet18"  # any timm model name
    pretrained: bool = False
    checkpoint_path: str | None = None
    drop_path_rate: float = 0.0
    global_pool: str = (
        "avg"  # timm's pooling of the last feature map: avg | max | avgmax (mean of the two)
    )

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> EncoderSpec:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(params or {}) - set(valid))
        if unknown:
            raise TypeError(f"encoder got unknown keys {unknown}; valid: {', '.join(valid)}")
        spec = cls(**dict(params or {}))
        if spec.global_pool not in POOLS:
            raise TypeError(f"encoder global_pool must be one of {POOLS}, got {spec.global_pool!r}")
        return spec

    def build(self, in_chans: int) -> tuple[nn.Module, int]:
        """A timm backbone without classifier: (B, in_chans, H, W) -> (B, F) pooled features.

        Returns the module and its feature width F.
        """
        kwargs: dict[str, Any] = {"global_pool": self.global_pool}
        if self.drop_path_rate:
            kwargs["drop_path_rate"] = self.drop_path_rate
        file = self.checkpoint_path or (local_weights(self.backbone) if self.pretrained else None)
        if file:
            kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
        model = timm.create_model(
            self.backbone,
            pretrained=self.pretrained or bool(file),
            in_chans=in_chans,
            num_classes=0,
            **kwargs,
        )
        return model, model.num_features


def create_encoder(encoder: Mapping[str, Any] | None, in_chans: int) -> tuple[nn.Module, int]:
    """``EncoderSpec.from_params(encoder).build(in_chans)``: what a model constructor calls."""
    return EncoderSpec.from_params(encoder).build(in_chans)
