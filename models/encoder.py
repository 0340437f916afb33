"""timm image encoders shared by the stage models (offline-safe)."""

from __future__ import annotations

import timm
from torch import nn


def create_encoder(
    backbone: str,
    in_chans: int,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, int]:
    """A timm backbone without classifier: (B, in_chans, H, W) -> (B, F) pooled features.

    ``pretrained`` downloads weights (needs internet); offline, give ``checkpoint_path`` to a local
    timm weight file instead (its first conv is adapted to ``in_chans`` by timm).
    Returns the module and its feature width F.
    """
    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    if checkpoint_path:
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
        pretrained = True
    model = timm.create_model(
        backbone, pretrained=pretrained, in_chans=in_chans, num_classes=0, **kwargs
    )
    return model, model.num_features
