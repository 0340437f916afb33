"""Patient level: the seven stage-2 vertebra logits of a study -> patient_overall + refined C1..C7."""

from __future__ import annotations

import torch
from torch import nn

from utils.registry import MODELS


@MODELS.register("patient_head")
class PatientHead(nn.Module):
    """A small MLP that sees all seven vertebrae of a study at once.

    Input: ``batch["logits"]`` (B, 7) stage-2 logits of C1..C7 (missing ones filled with the prior
    logit) and ``batch["missing"]`` (B, 7) 1.0 where stage 1 found no slices for that vertebra.
    Output ``logits`` (B, 8) in the order patient_overall, C1..C7. The C1..C7 outputs are the input
    logits plus a learned correction, so an untrained head starts from the stage-2 predictions.
    """

    def __init__(self, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(14, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 8)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        # patient_overall starts as a soft maximum over the vertebrae.
        self.overall_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, missing = batch["logits"].float(), batch["missing"].float()
        delta = self.mlp(torch.cat([logits, missing], dim=1))
        overall = self.overall_scale * torch.logsumexp(logits, dim=1, keepdim=True)
        out = torch.cat([overall, logits], dim=1) + delta
        return {"logits": out}
