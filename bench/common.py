"""What every benchmark shares: ``--threads``, warnings-only logging and the machine's load.

The machine is shared and noisy, so each benchmark prints the 1-minute load average at its start
and end beside its numbers (docs/benchmarks.md quotes them).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from utils import cli


def start(
    parser: argparse.ArgumentParser, argv: list[str] | None = None, threads: int = 2
) -> tuple[argparse.Namespace, float]:
    """Parse ``argv`` (``--threads`` added), log warnings only, set torch's thread count.

    Returns the arguments and the load average now.
    """
    parser.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    args = parser.parse_args(argv)
    cli.setup_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    return args, os.getloadavg()[0]


def load_note(load_start: float) -> str:
    """``load average <start> -> <now>`` for a benchmark's last line."""
    return f"load average {load_start:.2f} -> {os.getloadavg()[0]:.2f}"
