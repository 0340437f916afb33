"""Benchmark: RSNA preprocessing (DICOM -> uint8 volume cache) rate versus data-set size and workers.

Usage::

    python -m bench.bench_preprocess [--geometry demo|tiny|full] [--sizes 10 25 50 100] [--workers 1 2]
        [--repeat 1]
    python -m bench.bench_preprocess --quick          # tiny geometry, 5 and 10 studies

Writes ``max(--sizes)`` synthetic train studies with ``utils.rsna.synthetic`` (``plan_dataset`` +
``write_study``; the geometry of the ``demo`` preset: 80-110 slices of 256 x 256, ``tiny``:
32-48 of 64 x 64, or ``full``: the ``bench`` preset's 300 of 512 x 512 as the real studies,
e.g. ``--geometry full --sizes 2 4``), every study JPEG Lossless SV1 like the bench preset, no segmentations and no
odd cases, so every study costs about the same. Then, for each size N (the first N studies, linked
into their own competition folder) and each worker count, runs the pipeline's preprocessing
(``utils.rsna.preprocess.preprocess``, as ``python -m utils.preprocess_data --pipeline rsna
--workers W`` does, cache size of the matching profile) in a fresh process and reports wall
seconds, seconds per study, the peak RSS of that process (``RUSAGE_SELF``) and of its largest
pool worker (``RUSAGE_CHILDREN``). A linear fit ``seconds = fixed + N * per_study`` separates the
start-up cost (pool spawn, imports, table collection) from the per-study rate. CPU seconds
(parent + workers) per study are printed too, and the 1-minute load average before each run: on
a shared machine the wall-clock speed-up of a second worker is only meaningful at low load.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from utils import cli
from utils.rsna.metric import VERTEBRAE
from utils.rsna.synthetic.generator import PRESETS, plan_dataset, write_study

# geometry -> (synthetic preset, profile whose cache.size is used); full = the real studies' size
GEOMETRY = {"demo": ("demo", "demo"), "tiny": ("tiny", "tiny"), "full": ("bench", "full")}


def _write(job) -> int:
    spec, preset, seed, root = job
    return write_study(spec, preset, seed, root)[1]


def make_studies(root: Path, geometry: str, n: int, seed: int = 0) -> tuple[list[str], int]:
    """``n`` synthetic train studies under ``root/train_images``; returns (uids, total slices)."""
    preset = replace(
        PRESETS[GEOMETRY[geometry][0]],
        n_train=n,
        n_test=0,
        seg_fraction=0.0,
        odd_cases=False,
        syntax="jpeg_lossless",
    )
    specs = plan_dataset(preset, seed)
    (root / "train_images").mkdir(parents=True)
    jobs = [(spec, preset, seed, root) for spec in specs]
    with mp.Pool(2) as pool:
        slices = pool.map(_write, jobs, chunksize=1)
    return [s.uid for s in specs], sum(slices)


def subset(source: Path, uids: list[str], dest: Path) -> Path:
    """A competition folder holding the studies ``uids`` of ``source`` (linked) and their train.csv."""
    (dest / "train_images").mkdir(parents=True)
    for uid in uids:
        (dest / "train_images" / uid).symlink_to(source / "train_images" / uid)
    rows = pd.DataFrame({"StudyInstanceUID": uids, "patient_overall": 0})
    rows[VERTEBRAE] = 0
    rows.to_csv(dest / "train.csv", index=False)
    return dest


def run_one(data: Path, prep: Path, workers: int, profile: str) -> dict:
    """Preprocess ``data`` into ``prep`` in this process; timings and peak RSS (MiB)."""
    from utils.config import load_config
    from utils.rsna.preprocess import CONFIG, preprocess

    cfg = load_config(CONFIG, [f"profile={profile}", f"data_dir={data}", "progress=false"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    studies = preprocess(data, prep, cfg, workers=workers)
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "studies": len(studies),
        "slices": int(studies["n_slices"].sum()),
        "seconds": wall,
        "parent_cpu_s": time.process_time() - cpu0,
        "workers_cpu_s": children.ru_utime + children.ru_stime,
        "parent_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": children.ru_maxrss / 1024 if workers > 1 else float("nan"),
    }


def measure(data: Path, prep: Path, workers: int, profile: str) -> dict:
    """:func:`run_one` in a fresh interpreter, so peak RSS belongs to this run alone."""
    cmd = [sys.executable, "-m", "bench.bench_preprocess", "--run-one", str(data), str(prep)]
    cmd += ["--workers", str(workers), "--profile", profile]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--geometry", choices=sorted(GEOMETRY), default="demo")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="tiny geometry, 5 and 10 studies")
    parser.add_argument(
        "--run-one", nargs=2, type=Path, metavar=("DATA", "PREP"), help=argparse.SUPPRESS
    )
    parser.add_argument("--profile", default="demo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        cli.setup_logging(logging.WARNING)
        print(json.dumps(run_one(*args.run_one, args.workers[0], args.profile)))
        return
    if args.quick:
        args.geometry, args.sizes = "tiny", [5, 10]
    profile = GEOMETRY[args.geometry][1]
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        uids, slices = make_studies(tmp / "all", args.geometry, max(args.sizes))
        p = PRESETS[GEOMETRY[args.geometry][0]]
        print(
            f"wrote {len(uids)} studies ({slices} slices, {p.rows}x{p.rows}, JPEG Lossless) "
            f"in {time.perf_counter() - t0:.0f} s; cache profile {profile}"
        )
        rows = []
        for n in args.sizes:
            data = subset(tmp / "all", uids[:n], tmp / f"data{n}")
            for w in args.workers:
                prep = tmp / f"prep{n}_w{w}"
                load = os.getloadavg()[0]
                runs = []
                for _ in range(args.repeat):
                    runs.append(measure(data, prep, w, profile))
                    shutil.rmtree(prep)
                r = min(runs, key=lambda run: run["seconds"])
                cpu = (r["parent_cpu_s"] + r["workers_cpu_s"]) / n
                rows.append(
                    {"N": n, "workers": w, "load1": load, **r, "s_per_study": r["seconds"] / n}
                    | {"cpu_s_per_study": cpu}
                )
                print(
                    f"N={n:4d} workers={w}: {r['seconds']:7.2f} s  {r['seconds'] / n:6.3f} s/study  "
                    f"{cpu:6.3f} CPU s/study  parent RSS {r['parent_rss_mib']:.0f} MiB  "
                    f"worker RSS {r['worker_rss_mib']:.0f} MiB  (load {load:.1f})",
                    flush=True,
                )
    table = pd.DataFrame(rows)
    print()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))
    for w in args.workers:
        part = table[table.workers == w]
        if len(part) >= 2:
            per_study, fixed = np.polyfit(part["N"], part["seconds"], 1)
            print(
                f"workers={w}: seconds = {fixed:.2f} + N x {per_study:.3f} "
                f"({per_study / (slices / len(uids)) * 1e3:.2f} ms per slice)"
            )
    big = table[table["N"].eq(max(args.sizes))].set_index("workers")["seconds"]
    if {1, 2} <= set(big.index):
        print(f"speed-up 1 -> 2 workers at N={max(args.sizes)}: {big[1] / big[2]:.2f}x")


if __name__ == "__main__":
    main()
