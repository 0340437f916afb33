"""Stage 1: a 2.5D slice -> C1-C7 bounding box + per-vertebra area ratios."""

from __future__ import annotations

import torch
from torch import nn

from models.encoder import create_encoder
from utils.registry import MODELS


@MODELS.register("vertebra_bbox_ratio")
class VertebraBoxRatioNet(nn.Module):
    """timm encoder over adjacent slices stacked as channels, MLP head with 4 + 7 outputs.

    Input ``batch["image"]``: (B, in_chans, H, W) float, the centre slice in the middle channel;
    ``batch["z"]``: (B,) relative slice position in the study (0 = top, 1 = bottom). Single axial
    slices of C3..C7 look alike, so which vertebra a slice shows depends on where it lies in the
    stack: ``z_features`` sin/cos features of z join the image features (0 disables).
    Output: ``box`` (B, 4) = sigmoid(x0, y0, x1, y1) normalised to the image; ``ratio_logits``
    (B, 7) and ``ratios`` (B, 7) = their sigmoid, the C1..C7 area ratios of the centre slice.
    """

    def __init__(
        self,
        encoder: dict | None = None,
        in_chans: int = 3,
        dropout: float = 0.1,
        z_features: int = 8,
        hidden: int = 256,
    ):
        super().__init__()
        self.encoder, width = create_encoder(encoder, in_chans)
        freqs = torch.pi * torch.arange(1, z_features // 2 + 1, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width + 2 * len(freqs), hidden),
            nn.GELU(),
            nn.Linear(hidden, 11),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feats = self.encoder(batch["image"])
        if len(self.freqs):
            angle = batch["z"].float()[:, None] * self.freqs
            z = torch.cat([angle.sin(), angle.cos()], dim=1).to(feats.dtype)
            feats = torch.cat([feats, z], dim=1)
        out = self.head(feats).float()
        return {
            "box": out[:, :4].sigmoid(),
            "ratio_logits": out[:, 4:],
            "ratios": out[:, 4:].sigmoid(),
        }
