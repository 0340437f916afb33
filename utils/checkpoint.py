"""Atomic, self-describing checkpoints (weights + optimizer state + the resolved config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.io import atomic_path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with torch.save to a temp file, then move it onto ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (plain python/tensor content only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
