"""Benchmark: HipMRI training throughput and memory on this CPU.

Usage::

    python -m bench.bench_hipmri [--batches 20] [--threads 2] [--skip-epoch] [--quick]

1. Training slices/s of the demo model (``config/hipmri/unet.yaml``, demo profile: UNet
   16-128 channels at scale 0.5, batch 8, bf16 autocast + channels_last), fed by the real
   dataset (NIfTI slices streamed from disk, augmentation on) of the ``demo`` synthetic preset:
   train.py's ``train_one_epoch`` over ``--batches`` batches after 2 warm-up batches, and the
   peak RSS of this process.
2. A full-size epoch: the ``bench`` preset (11,400 train slices, the size of the real train
   split) converted and trained for one epoch by ``train.py`` (demo model, given split, with its
   validation pass) in a child process; its wall time and peak RSS (``ru_maxrss`` of children).

``--quick`` uses the tiny preset for both (a smoke test). Data go to a temporary folder.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from train import train_one_epoch
from utils import cli, engine
from utils.config import load_config
from utils.fold_split import main as folds_main
from utils.hipmri.folds import training_slices
from utils.hipmri.synthetic import generate
from utils.preprocess_data import main as preprocess_main
from utils.registry import build_dataset, build_loss, build_model

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "config" / "hipmri" / "unet.yaml"
BASE = ROOT / "config" / "hipmri" / "base.yaml"


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


def prepare(data: Path, output: Path, preset: str) -> list[str]:
    """Generate ``preset`` into ``data``, convert it and write the given-split folds; the overrides."""
    t0 = time.perf_counter()
    counts = generate(data, preset=preset, seed=0)
    print(f"generated {preset}: {counts} in {time.perf_counter() - t0:.0f} s", flush=True)
    ov = ["profile=demo", f"data_dir={data}", f"output_dir={output}", "progress=false"]
    preprocess_main(["--pipeline", "hipmri", *ov])
    folds_main(["--CFG", str(BASE), *ov])
    return ov


def throughput(ov: list[str], batches: int) -> tuple[float, float]:
    """(training slices/s, peak RSS MiB) of the demo model over ``batches`` batches."""
    cfg = load_config(STAGE, ov)
    device = engine.resolve_device(cfg.device)
    table = training_slices(cfg)
    ds = build_dataset(cfg, table[table["split"] == "train"], train=True)
    model = engine.prepare_model(build_model(cfg), cfg, device)
    loss_fn = build_loss(cfg)
    opt, sched = engine.build_optimizer(cfg, model, batches + 2)
    scaler = torch.amp.GradScaler(device.type, enabled=engine.needs_scaler(cfg, device))
    warm = cfg.replace(**{"train.max_train_batches": 2})
    train_one_epoch(
        warm, model, engine.make_loader(cfg, ds, True, 0), loss_fn, opt, sched, scaler, device
    )
    timed = cfg.replace(**{"train.max_train_batches": batches})
    t0 = time.perf_counter()
    loader = engine.make_loader(cfg, ds, True, 1)
    train_one_epoch(timed, model, loader, loss_fn, opt, sched, scaler, device)
    seconds = time.perf_counter() - t0
    return batches * cfg.train.batch_size / seconds, peak_rss_mb()


def full_epoch(ov: list[str]) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB, train slices) of one train.py epoch in a child process."""
    cfg = load_config(STAGE, ov)
    n_train = int((training_slices(cfg)["split"] == "train").sum())
    cmd = [sys.executable, "train.py", "--CFG", str(STAGE), "--fold", "0", *ov, "train.epochs=1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, peak_rss_mb(resource.RUSAGE_CHILDREN), n_train


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--batches", type=int, default=20, help="timed training batches")
    parser.add_argument("--skip-epoch", action="store_true", help="only the throughput part")
    parser.add_argument("--quick", action="store_true", help="tiny preset (smoke test)")
    args, load_start = common.start(parser, argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the full-epoch child process
    with tempfile.TemporaryDirectory(prefix="bench_hipmri_") as tmp:
        tmp = Path(tmp)
        ov = prepare(tmp / "demo", tmp / "out_demo", "tiny" if args.quick else "demo")
        rate, rss = throughput(ov, 2 if args.quick else args.batches)
        print(
            f"demo model training: {rate:.1f} slices/s, peak RSS {rss:.0f} MiB "
            f"({args.threads} threads, load average {load_start:.1f} at start)",
            flush=True,
        )
        if args.skip_epoch:
            return
        ov = prepare(tmp / "full", tmp / "out_full", "tiny" if args.quick else "bench")
        seconds, rss, n = full_epoch(ov)
        print(
            f"full-size epoch: {n} train slices in {seconds:.0f} s ({n / seconds:.1f} slices/s "
            f"incl. validation), peak RSS {rss:.0f} MiB; load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
