"""Opt-in experiment tracking (``tracker.name``): each metrics.csv row also goes to TensorBoard or wandb.

The tracker library is imported only when selected; a missing one is a one-line error naming
the package. wandb runs offline by default (``tracker.wandb_mode``) with no entity: the project
is ``tracker.project`` or the experiment name, the run is ``<exp_name>-fold<k>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.config import ConfigError
from utils.errors import InputError

TRACKERS = ("none", "tensorboard", "wandb")


class Tracker:
    """No tracking (``tracker.name: none``); the interface of the others."""

    def log(self, row: Mapping[str, Any], step: int) -> None:
        """Record the numeric values of one metrics.csv row at ``step`` (the epoch, from 1)."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Scalars in ``<run>/tensorboard/`` (``tensorboard --logdir output/<pipeline>/<exp>``)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError(
                "tracker.name=tensorboard needs the 'tensorboard' package (pip install tensorboard)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """One wandb run per fold, files under ``<run>/wandb/``; offline unless ``tracker.wandb_mode``."""

    def __init__(self, cfg, run: Path, fold: int):
        try:
            import wandb
        except ImportError:
            raise InputError(
                "tracker.name=wandb needs the 'wandb' package (pip install wandb)"
            ) from None
        run.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg["tracker"]["project"] or cfg["exp_name"],
            name=f"{cfg['exp_name']}-fold{fold}",
            group=cfg["exp_name"],
            dir=str(run),
            mode=cfg["tracker"]["wandb_mode"],
            config=cfg.to_dict(),
        )

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}


def make_tracker(cfg, run: Path, fold: int) -> Tracker:
    """The tracker ``tracker.name`` selects for fold ``fold`` writing under its run folder ``run``."""
    name = cfg["tracker"]["name"] or "none"
    if name == "none":
        return Tracker()
    if name == "tensorboard":
        return TensorBoardTracker(run / "tensorboard")
    if name == "wandb":
        return WandbTracker(cfg, run, fold)
    raise ConfigError(f"tracker.name must be one of {list(TRACKERS)}, got {name!r}")
