"""Shared by every test: the repository root, one torch thread per process, and the entry
point that converts a data set (each pipeline's fixtures live in tests/<pipeline>/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "2")


def preprocess(pipeline: str, *argv: str) -> None:
    """``python -m utils.preprocess_data --pipeline <pipeline> ARGV...`` in this process."""
    from utils.preprocess_data import main

    main(["--pipeline", pipeline, *argv])
