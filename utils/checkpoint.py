"""Atomic, self-describing checkpoints (weights + optimizer state + the resolved config)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable
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


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", keys: Iterable[str] = ("config",)
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (plain python/tensor content only).

    A missing, truncated or foreign file (not a torch zip, unpickling refused, no ``keys``) is
    an InputError naming it: a damaged run must never reach training or prediction.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise InputError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "delete it (or its run) and train again"
        ) from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path} is not a checkpoint of this repository (no {', '.join(missing)})")
    return state


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
