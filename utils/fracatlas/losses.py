"""FracAtlas classifier loss (registered in ``utils.registry.LOSSES``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.registry import LOSSES


@LOSSES.register("fracatlas_bce")
class FractureBce(nn.Module):
    """BCE of ``logits`` (B,) vs ``fractured`` (B,) 0/1; ``pos_weight`` scales the fractured terms.

    ``pos_weight`` = negatives / positives balances the classes (FracAtlas: 3366 / 717 = 4.7).
    Computed in float32 under autocast.
    """

    def __init__(self, pos_weight: float = 1.0):
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            out["logits"].float(), batch["fractured"].float(), pos_weight=self.pos_weight
        )
