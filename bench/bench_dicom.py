"""Benchmark: ``utils.rsna.dicom.load_study`` vs the seed's per-slice pydicom loop on one CT series.

Usage::

    python -m bench.bench_dicom [--slices 300] [--size 512] [--repeat 3]

Writes the JPEG Lossless SV1 CT series of the ``bench`` preset of ``utils.rsna.synthetic`` (its
phantom neck CT, resized by ``--slices`` / ``--size``) into a temporary folder, reads it once to
warm the page cache, then times, as the median of ``--repeat`` interleaved rounds:

- seed: ``pydicom.dcmread`` + ``pixel_array * slope + intercept`` per file, sorted by
  ImagePositionPatient z (head first), ``np.stack``;
- ours: ``load_study`` as the pipeline calls it (auto backend, 1 thread), then with 2 decoding
  threads and with the dicomsdl backend alone, to show where the speed comes from.

Prints wall time, slices/s, process CPU time (the machine is shared: CPU time is the steadier
number), the speed-up over the seed and whether each HU volume is identical to the seed's (same
slice order), then a final one-line summary.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom

from utils import cli
from utils.rsna.dicom import load_study
from utils.rsna.synthetic.generator import PRESETS, plan_dataset, write_study


def make_series(root: Path, n_slices: int, size: int) -> Path:
    """Write the ``utils.rsna.synthetic`` ``bench`` study (seed 0) with ``n_slices`` slices of
    ``size`` x ``size`` under ``root``; returns its folder. With the defaults (300, 512) this is
    exactly the train study of ``generate(root, "bench", seed=0)``."""
    preset = replace(PRESETS["bench"], rows=size, n_slices=(n_slices, n_slices))
    (spec,) = plan_dataset(preset, seed=0)
    write_study(spec, preset, 0, root)
    (study,) = (root / "train_images").iterdir()
    return study


def seed_load(study_dir: Path) -> np.ndarray:
    """The seed approach: (Z, H, W) float64 HU, head first by ImagePositionPatient z."""
    slices = []
    for path in study_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda s: -s[0])
    return np.stack([hu for _, hu in slices])


def time_readers(
    readers: dict[str, Callable[[Path], np.ndarray]], study_dir: Path, repeat: int
) -> dict[str, tuple[float, float, np.ndarray]]:
    """Per reader: median wall and process-CPU times (s) over ``repeat`` rounds, and its volume.

    Rounds interleave the readers so that load from other processes on the shared machine hits
    them alike.
    """
    walls: dict[str, list[float]] = {name: [] for name in readers}
    cpus: dict[str, list[float]] = {name: [] for name in readers}
    volumes: dict[str, np.ndarray] = {}
    for _ in range(repeat):
        for name, read in readers.items():
            wall, cpu = time.perf_counter(), time.process_time()
            volumes[name] = read(study_dir)
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {
        name: (statistics.median(walls[name]), statistics.median(cpus[name]), volumes[name])
        for name in readers
    }


def main() -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cli.setup_logging(logging.INFO)

    readers: dict[str, Callable[[Path], np.ndarray]] = {
        "seed (pydicom per slice)": seed_load,
        "load_study": lambda d: load_study(d).hu,
        "load_study threads=2": lambda d: load_study(d, threads=2).hu,
        "load_study dicomsdl": lambda d: load_study(d, backend="dicomsdl").hu,
    }
    with tempfile.TemporaryDirectory() as tmp:
        study_dir = make_series(Path(tmp), args.slices, args.size)
        files = sorted(study_dir.glob("*.dcm"))
        for path in files:  # warm the page cache
            path.read_bytes()
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        timings = time_readers(readers, study_dir, args.repeat)

    n = len(files)
    seed_wall, _, seed_hu = timings["seed (pydicom per slice)"]
    print(
        f"series: utils.rsna.synthetic bench, {n} slices {header.Rows}x{header.Columns}, "
        f"{header.file_meta.TransferSyntaxUID.name}; median of {args.repeat}"
    )
    print(
        f"{'reader':26s} {'wall s':>7s} {'slices/s':>9s} {'CPU s':>7s} {'speed-up':>9s}  HU identical"
    )
    for name, (wall, cpu, hu) in timings.items():
        identical = bool(np.array_equal(hu, seed_hu))
        print(
            f"{name:26s} {wall:7.3f} {n / wall:9.0f} {cpu:7.3f} {seed_wall / wall:8.2f}x  {identical}"
        )
    wall, _, hu = timings["load_study"]
    print(
        f"SUMMARY bench_dicom: {n} slices {args.size}px, seed {n / seed_wall:.0f}/s, "
        f"load_study {n / wall:.0f}/s, {seed_wall / wall:.2f}x, "
        f"identical={bool(np.array_equal(hu, seed_hu))}"
    )


if __name__ == "__main__":
    main()
