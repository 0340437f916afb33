"""Seeding: one recorded seed drives python, numpy, torch and the data loaders."""

from __future__ import annotations

import random

import numpy as np
import torch

from utils.cli import process_rank


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed + rank``.

    Each DDP process gets its own stream (its own dropout masks and augmentations); a single
    process (rank 0) uses ``seed`` itself, so results do not change when run alone.
    """
    seed = seed + process_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    """A generator for DataLoader shuffling, so the sample order depends only on ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def worker_init_fn(worker_id: int) -> None:
    """Per-worker setup: distinct numpy / python seeds derived from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
