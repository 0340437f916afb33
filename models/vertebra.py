"""Stage 1: a 2.5D slice -> C1-C7 bounding box + per-vertebra area ratios."""

from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.encoder import create_encoder


@MODELS.register("vertebra_bbox_ratio")
class VertebraBoxRatioNet(nn.Module):
    """timm encoder over adjacent slices stacked as channels, linear head with 4 + 7 outputs.

    Input ``batch["image"]``: (B, in_chans, H, W) float, the centre slice in the middle channel.
    Output: ``logits`` (B, 11); ``box`` (B, 4) = sigmoid(x0, y0, x1, y1) normalised to the image;
    ``ratios`` (B, 7) = sigmoid of the C1..C7 area ratios of the centre slice.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_chans: int = 3,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder, width = create_encoder(
            backbone, in_chans, pretrained, checkpoint_path, drop_path_rate
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 11))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.head(self.encoder(batch["image"])).float()
        return {"logits": logits, "box": logits[:, :4].sigmoid(), "ratios": logits[:, 4:].sigmoid()}
