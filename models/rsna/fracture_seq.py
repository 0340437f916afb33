"""Stage 2: a per-vertebra sequence of 2.5D crops -> one fracture logit."""

from __future__ import annotations

import torch
from torch import nn

from models.encoder import create_encoder
from utils.registry import MODELS


class AttentionPool(nn.Module):
    """Additive attention over a sequence: (B, S, D) -> (B, D) and weights (B, S)."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.score(x).squeeze(-1).softmax(dim=1)
        return (weights.unsqueeze(-1) * x).sum(dim=1), weights


@MODELS.register("fracture_seq")
class FractureSeqNet(nn.Module):
    """timm encoder per slice -> bidirectional GRU/LSTM over the sequence -> attention -> logit.

    Input ``batch["image"]``: (B, S, C, H, W) float (S slices of the vertebra, each C adjacent
    slices). Output: ``logit`` (B,), ``attention`` (B, S), ``embedding`` (B, 2 * hidden).
    """

    def __init__(
        self,
        encoder: dict | None = None,
        in_chans: int = 3,
        rnn: str = "gru",
        hidden: int = 256,
        num_layers: int = 1,
        dropout: float = 0.2,
    ):
        super().__init__()
        if rnn not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got {rnn!r}")
        self.encoder, width = create_encoder(encoder, in_chans)
        rnn_cls = nn.GRU if rnn == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            width, hidden, num_layers=num_layers, batch_first=True, bidirectional=True
        )
        self.pool = AttentionPool(2 * hidden)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        b, s = x.shape[:2]
        feats = self.encoder(x.flatten(0, 1)).view(b, s, -1)
        # Recurrent layers run in fp32: bf16 autocast has no CPU RNN kernels and gains nothing here.
        with torch.autocast(device_type=x.device.type, enabled=False):
            seq, _ = self.rnn(feats.float())
            emb, weights = self.pool(seq)
            logit = self.head(emb).squeeze(-1)
        return {"logit": logit, "attention": weights, "embedding": emb}
