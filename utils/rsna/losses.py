"""RSNA 2022 losses, registered in ``utils.registry.LOSSES``: ``loss(outputs, batch) -> scalar tensor``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.registry import LOSSES
from utils.rsna.metric import WEIGHTS

OVERALL_WEIGHTS = WEIGHTS["patient_overall"]  # (positive, negative) competition weights
VERTEBRA_WEIGHTS = WEIGHTS["C1"]


@LOSSES.register("box_ratio")
class BoxRatioLoss(nn.Module):
    """Stage 1: ``box_weight`` x L1(box) on slices showing a vertebra + ``ratio_weight`` x ratio loss.

    ``ratio_loss``: ``bce`` (binary cross-entropy of the ratio logits against the soft ratio
    targets) or ``l1`` (the seed's L1 on the sigmoid ratios). Most slices show no given vertebra,
    so L1 is minimised by predicting 0 and its gradient through a saturated sigmoid vanishes: on
    the demo data it never left that state, while BCE keeps a gradient (p - y) and learns.
    Targets: ``batch["box"]`` (B, 4) normalised, ``batch["ratios"]`` (B, 7), ``batch["vertebrae"]`` (B,).
    ``ratio_pos_weight`` (7,): BCE weight of each vertebra's positive term (None: 1 for all), for a
    vertebra that few slices show (C1 spans a third of the slices of the others).
    """

    def __init__(
        self,
        box_weight: float = 0.5,
        ratio_weight: float = 0.5,
        ratio_loss: str = "bce",
        ratio_pos_weight: list[float] | None = None,
    ):
        super().__init__()
        if ratio_loss not in ("bce", "l1"):
            raise ValueError(f"ratio_loss must be 'bce' or 'l1', got {ratio_loss!r}")
        self.box_weight, self.ratio_weight, self.ratio_loss = box_weight, ratio_weight, ratio_loss
        weight = (
            None
            if ratio_pos_weight is None
            else torch.tensor(ratio_pos_weight, dtype=torch.float32)
        )
        if weight is not None and weight.shape != (7,):
            raise ValueError(f"ratio_pos_weight needs 7 values (C1..C7), got {ratio_pos_weight}")
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ratio_loss == "bce":
            ratio = F.binary_cross_entropy_with_logits(
                out["ratio_logits"],
                batch["ratios"],
                pos_weight=None
                if self.pos_weight is None
                else self.pos_weight.to(out["ratio_logits"].device),
            )
        else:
            ratio = F.l1_loss(out["ratios"], batch["ratios"])
        has_box = batch["vertebrae"] > 0
        box = (
            F.l1_loss(out["box"][has_box], batch["box"][has_box])
            if has_box.any()
            else out["box"].sum() * 0.0  # keeps the graph when a batch holds no vertebra slice
        )
        return self.box_weight * box + self.ratio_weight * ratio


@LOSSES.register("weighted_bce")
class WeightedBCE(nn.Module):
    """Stage 2: BCE on one logit per sample, positives weighted ``pos_weight``, negatives ``neg_weight``.

    Normalised by the weight sum (as the metric does), so the 2:1 ratio really changes training.
    """

    def __init__(
        self, pos_weight: float = VERTEBRA_WEIGHTS[0], neg_weight: float = VERTEBRA_WEIGHTS[1]
    ):
        super().__init__()
        self.pos_weight, self.neg_weight = pos_weight, neg_weight

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y = batch["target"].float()
        w = torch.where(y > 0.5, self.pos_weight, self.neg_weight)
        loss = F.binary_cross_entropy_with_logits(out["logit"], y, reduction="none")
        return (w * loss).sum() / w.sum()


@LOSSES.register("competition")
class CompetitionLoss(nn.Module):
    """Patient level: the competition metric as a loss (per-study weighted log loss, mean over studies).

    ``out["logits"]`` and ``batch["targets"]``: (B, 8) in the order patient_overall, C1..C7.
    """

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y = batch["targets"].float()
        pos = torch.tensor([OVERALL_WEIGHTS[0]] + [VERTEBRA_WEIGHTS[0]] * 7, device=y.device)
        neg = torch.tensor([OVERALL_WEIGHTS[1]] + [VERTEBRA_WEIGHTS[1]] * 7, device=y.device)
        w = y * pos + (1 - y) * neg
        loss = F.binary_cross_entropy_with_logits(out["logits"].float(), y, reduction="none")
        return ((w * loss).sum(dim=1) / w.sum(dim=1)).mean()
