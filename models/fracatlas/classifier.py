"""Image-level fracture classifier: any timm encoder + one logit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.encoder import create_encoder
from utils.registry import MODELS


@MODELS.register("fracatlas_classifier")
class FractureClassifier(nn.Module):
    """``image`` (B, in_chans, S, S) -> ``logits`` (B,) of "fractured".

    ``encoder``: the timm backbone spec (models/encoder.py: backbone name, pretrained,
    checkpoint_path); ``in_chans`` comes from the dataset (1 grayscale, 2 with the nnU-Net
    fracture map); ``dropout`` before the linear head.
    """

    def __init__(
        self, encoder: Mapping[str, Any] | None = None, in_chans: int = 1, dropout: float = 0.0
    ):
        super().__init__()
        self.encoder, width = create_encoder(encoder, in_chans)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.encoder(batch["image"])).squeeze(1)}
