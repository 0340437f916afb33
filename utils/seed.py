"""Seeding: one recorded seed drives python, numpy, torch and the data loaders."""

from __future__ import annotations

import os
import random

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset


def process_rank() -> int:
    """This process's rank in a ``torchrun`` job (``RANK``), 0 when run alone."""
    return int(os.environ.get("RANK", "0"))


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


class EpochSeededDataset(Dataset):
    """A dataset over the rows of ``table`` whose random draws depend only on (seed, epoch, row).

    train.py calls ``set_epoch`` before every epoch; drawing each sample's augmentation from
    ``rng(index)`` makes a resumed run, any number of loader workers and any process count draw
    exactly what an uninterrupted single-process run draws.
    """

    def __init__(self, table: pd.DataFrame, seed: int):
        self.table = table.reset_index(drop=True)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.table)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])
