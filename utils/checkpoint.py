"""Atomic, self-describing checkpoints (weights + optimizer state + the resolved config)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from utils.config import Config, diff_configs
from utils.errors import InputError
from utils.io import atomic_path

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with torch.save to a temp file, then move it onto ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (plain python/tensor content only)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def resume_state(cfg: Config, run: Path) -> dict | None:
    """The ``last.pth`` state to continue from, None for a fresh start; error on a config mismatch."""
    last = run / "last.pth"
    if cfg.resume == "never" or not last.is_file():
        return None
    state = load_checkpoint(last)
    changed = diff_configs(state["config"], cfg.to_dict())
    if changed:
        raise InputError(
            f"{last} was trained with a different config ({', '.join(changed)}); "
            "use another exp_name/output_dir, delete the run, or pass resume=never"
        )
    log.info("resuming from %s (epoch %d done)", last, state["epoch"] + 1)
    return state
