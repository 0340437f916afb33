"""HipMRI losses (registered in ``utils.registry.LOSSES``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.registry import LOSSES


@LOSSES.register("ce_dice")
class CeDice(nn.Module):
    """``ce_weight * CE + dice_weight * (1 - soft Dice)`` on ``logits`` (B, C, H, W) vs ``mask`` (B, H, W).

    The soft Dice is pooled over the batch (nnU-Net's batch Dice) and averaged over the
    foreground classes, so the small prostate weighs as much as the body; ``smooth`` keeps a
    class missing from the batch from dominating. Computed in float32 under autocast.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.ce_weight, self.dice_weight, self.smooth = ce_weight, dice_weight, smooth

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, target = out["logits"].float(), batch["mask"]
        ce = F.cross_entropy(logits, target)
        probs = logits.softmax(dim=1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
        inter = (probs * onehot).sum(dim=(0, 2, 3))
        total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
        dice = (2 * inter + self.smooth) / (total + self.smooth)
        return self.ce_weight * ce + self.dice_weight * (1 - dice.mean())
