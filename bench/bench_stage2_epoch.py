"""Benchmark: one stage-2 training epoch from the uint8 cache vs decoding DICOM every epoch (seed).

Usage::

    python -m bench.bench_stage2_epoch [--studies 6] [--size 512] [--syntax S] [--workers N]
        [--repeat 3] [--model] [--threads 2] [--quick]

Data: ``--studies`` train studies of the ``demo`` preset of ``utils.rsna.synthetic`` (seed 0,
its mix of Explicit VR / JPEG Lossless / RLE, one reversed and one non-square study), at
``--size`` px and 200-240 slices (~0.7 mm, like the real RSNA studies), all segmented, written
into a temporary folder (``--syntax`` writes every study in one transfer syntax). Per recipe the studies are preprocessed into the uint8 cache
(``utils.rsna.preprocess.preprocess``), the segmentation-derived per-slice labels stand in for
perfect stage-1 OOF predictions, and ``utils.rsna.localize.make_stage2_labels`` +
``VertebraSequences.load_table`` give the stage-2 table (7 vertebrae per study).

Compared on that table, through ``utils.engine.make_loader`` (train mode: shuffling, the
recipe's batch size and ``num_workers``, augmentation on), iterating batches only:

- ours: ``VertebraSequences`` reading the memory-mapped uint8 cache;
- seed-style (BASELINE, defined here): the same sample logic, but every slice a sample needs is
  read from its DICOM file with ``pydicom.dcmread`` + ``pixel_array`` and min-max scaled to
  uint8 per slice (the seed's ``load_dicom``), then cropped and resized from full resolution.
  Each needed slice is decoded once per sample.

Recipes: ``demo`` (80 px x 8 slices, cache 160, batch 8, no workers) and ``full`` (224 px x 24,
cache 384, batch 8, 2 workers; ``--workers`` overrides both). Epoch times are medians of ``--repeat`` epochs after one
warm-up epoch, alternating the two datasets. ``--model`` also times one demo-recipe epoch with
the model (train.py's ``train_one_epoch``, bf16 + channels_last) for each dataset.
``--quick``: 3 studies of 128 px x 40-48 slices, the full recipe at 64 px x 4, one epoch.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
from torch.utils.data import Dataset

from bench import common
from train import train_one_epoch
from utils import cli, paths
from utils.config import Config, load_config
from utils.engine import build_optimizer, make_loader, needs_scaler, prepare_model, resolve_device
from utils.io import write_csv
from utils.registry import DATASETS, build_dataset, build_loss, build_model
from utils.rsna import layout
from utils.rsna.datasets import VertebraSequences
from utils.rsna.localize import make_stage2_labels
from utils.rsna.preprocess import preprocess
from utils.rsna.synthetic.generator import LABEL_COLS, PRESETS, plan_dataset, write_study
from utils.rsna.synthetic.writers import TRANSFER_SYNTAXES
from utils.seed import seed_everything

log = logging.getLogger(__name__)
CONFIG = Path(__file__).resolve().parents[1] / "config" / "rsna" / "stage2_fracture.yaml"
QUICK_FULL = ("cache.size=64", "dataset.params.image_size=64", "dataset.params.seq_len=4")


# ---- data -------------------------------------------------------------------------------------
def make_dataset(
    root: Path, n_studies: int, size: int, n_slices: tuple[int, int], syntax: str | None
) -> None:
    """Write ``n_studies`` segmented demo-preset train studies and ``train.csv`` under ``root``.

    ``syntax``: one of ``utils.rsna.synthetic.writers.TRANSFER_SYNTAXES`` for every study, or None for the
    preset's mix.
    """
    preset = replace(
        PRESETS["demo"],
        n_train=n_studies,
        n_test=0,
        rows=size,
        n_slices=n_slices,
        seg_fraction=1.0,
    )
    specs = plan_dataset(preset, seed=0)
    if syntax is not None:
        specs = [replace(spec, syntax=syntax) for spec in specs]
    for spec in specs:
        write_study(spec, preset, 0, root)
    labels = [(s.uid, int(any(s.labels)), *s.labels) for s in specs]
    write_csv(pd.DataFrame(labels, columns=LABEL_COLS), layout.labels_csv(root))


def stage2_table(cfg: Config) -> pd.DataFrame:
    """Cache the studies and build the stage-2 training table of ``cfg``.

    The segmentation-derived per-slice ratios and boxes (``prep/stage1_labels.csv``) are written
    as the stage-1 (``stages.vertebra``) OOF predictions, then localised exactly as for training.
    """
    prep = paths.prep_dir(cfg)
    # workers=2 caches in spawned processes: OpenCV run here would make the forked loader
    # workers of the full recipe hang (see main).
    preprocess(paths.data_dir(cfg), prep, cfg, workers=2)
    truth = pd.read_csv(layout.stage1_labels_csv(prep))
    write_csv(truth, paths.preds_csv(cfg, cfg.stages.vertebra))
    make_stage2_labels(cfg)
    return DATASETS.get(cfg.dataset.name).load_table(cfg)


# ---- seed-style baseline ----------------------------------------------------------------------
def seed_read(path: Path) -> np.ndarray:
    """The seed's ``load_dicom``: (H, W) uint8 = per-slice min-max of the stored pixel values
    (no rescale to HU, no window)."""
    img = pydicom.dcmread(path).pixel_array.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    return ((img - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)


def head_first_files(study_dir: Path) -> tuple[list[Path], tuple[int, int]]:
    """The study's files ordered head -> feet by ImagePositionPatient z, as the cache is, and
    the (rows, columns) of its slices."""
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in study_dir.glob("*.dcm")}
    files = sorted(headers, key=lambda p: -float(headers[p].ImagePositionPatient[2]))
    first = headers[files[0]]
    return files, (int(first.Rows), int(first.Columns))


class DicomSlices:
    """Stands in for a cached volume: ``vol[idx, rows, cols]`` -> (len(idx), h, w) uint8 read
    from DICOM, ``shape`` (Z, H, W) at full resolution.

    Each slice is decoded whole (and min-max scaled) on first use and kept for the life of this
    object (one sample); the region is cropped from the decoded full-resolution slices.
    """

    def __init__(self, files: list[Path], size: tuple[int, int]):
        self.files = files
        self.shape = (len(files), *size)
        self.decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> np.ndarray:
        idx, *region = key if isinstance(key, tuple) else (key,)
        for k in map(int, idx):
            if k not in self.decoded:
                self.decoded[k] = seed_read(self.files[k])
        return np.stack([self.decoded[int(k)] for k in idx])[(slice(None), *region)]


class SeedStyleSequences(VertebraSequences):
    """BASELINE, not pipeline code: ``VertebraSequences`` fed from DICOM the seed's way.

    Every ``__getitem__`` decodes the slices its sequence needs with pydicom (per-slice min-max
    to uint8) and crops/resizes them from full resolution; sampling, crops, augmentation and
    tensors are ours, so only the data source differs. The file order (and slice size) of each
    study is indexed once here (the seed stored slice lists in its table).
    """

    def __init__(self, table: pd.DataFrame, cfg: Config, train: bool, **params):
        super().__init__(table, cfg, train, **params)
        data = paths.data_dir(cfg)
        self.files = {
            uid: head_first_files(layout.study_dir(data, "train", uid))
            for uid in self.table.StudyInstanceUID.unique()
        }

    def volume(self, uid: str) -> DicomSlices:
        return DicomSlices(*self.files[uid])


# ---- timing -----------------------------------------------------------------------------------
def data_epoch(cfg: Config, ds: Dataset, epoch: int) -> tuple[float, int]:
    """Iterate one training epoch of batches (no model): (seconds, samples)."""
    start, n = time.perf_counter(), 0
    for batch in make_loader(cfg, ds, True, epoch):
        n += len(batch["image"])
    return time.perf_counter() - start, n


def model_epoch(cfg: Config, ds: Dataset) -> tuple[float, int]:
    """One training epoch with the model as train.py runs it: (seconds, samples)."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = prepare_model(build_model(cfg), cfg, device)
    loader = make_loader(cfg, ds, True, 0)
    opt, sched = build_optimizer(cfg, model, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler(cfg, device))
    start = time.perf_counter()
    train_one_epoch(cfg, model, loader, build_loss(cfg), opt, sched, scaler, device)
    return time.perf_counter() - start, len(loader) * int(cfg.train.batch_size)


@dataclass(frozen=True)
class RecipeResult:
    """Median epoch seconds per dataset, and the samples per epoch."""

    cfg: Config
    seconds: dict[str, float]
    samples: int
    model_seconds: dict[str, float]


def time_recipe(
    recipe: str,
    data: Path,
    out: Path,
    repeat: int,
    with_model: bool,
    quick: bool,
    workers: int | None,
) -> RecipeResult:
    """Data-only epochs (median of ``repeat`` after one warm-up) of both datasets of ``recipe``.

    ``workers`` overrides the recipe's ``num_workers`` (None keeps it).
    """
    overrides = [f"profile={recipe}", f"data_dir={data}", f"output_dir={out}", "progress=false"]
    if quick and recipe == "full":
        overrides += QUICK_FULL
    if workers is not None:
        overrides.append(f"num_workers={workers}")
    cfg = load_config(CONFIG, overrides)
    table = stage2_table(cfg)
    datasets = {
        "ours (uint8 cache)": build_dataset(cfg, table, True),
        "seed-style (DICOM)": SeedStyleSequences(table, cfg, True, **cfg.dataset.params),
    }
    for ds in datasets.values():
        data_epoch(cfg, ds, 0)
    times: dict[str, list[float]] = {name: [] for name in datasets}
    samples = 0
    for epoch in range(1, repeat + 1):
        for name, ds in datasets.items():
            seconds, samples = data_epoch(cfg, ds, epoch)
            times[name].append(seconds)
    model_seconds = {}
    if with_model:
        for name, ds in datasets.items():
            model_seconds[name] = model_epoch(cfg, ds)[0]
    medians = {name: statistics.median(t) for name, t in times.items()}
    return RecipeResult(cfg, medians, samples, model_seconds)


def main() -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="timed epochs per dataset")
    parser.add_argument(
        "--syntax",
        choices=sorted(TRANSFER_SYNTAXES),
        default=None,
        help="transfer syntax of every study (default: the demo preset's mix)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="num_workers for both recipes (default: theirs)"
    )
    parser.add_argument("--model", action="store_true", help="also time a demo epoch with model")
    parser.add_argument("--quick", action="store_true", help="small data and sizes (smoke test)")
    args, load_start = common.start(parser)
    if args.quick:
        n_studies, size, n_slices, repeat = 3, 128, (40, 48), 1
    else:
        n_studies, size, n_slices, repeat = args.studies, args.size, (200, 240), args.repeat

    results: dict[str, RecipeResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        start = time.perf_counter()
        make_dataset(data, n_studies, size, n_slices, args.syntax)
        written = time.perf_counter() - start
        # Full first: its loaders fork workers, which hang in utils.seed.worker_init_fn's
        # cv2.setNumThreads(1) once this process has used OpenCV's thread pool (the demo
        # recipe augments in-process, num_workers 0).
        for recipe in ("full", "demo"):
            with_model = args.model and recipe == "demo"
            results[recipe] = time_recipe(
                recipe,
                data,
                Path(tmp) / f"out_{recipe}",
                repeat,
                with_model,
                args.quick,
                args.workers,
            )

    print(
        f"data: {n_studies} demo-preset studies, {size}px, {n_slices[0]}-{n_slices[1]} slices, "
        f"syntax {args.syntax or 'preset mix'} "
        f"(written in {written:.0f} s); median of {repeat} epochs after 1 warm-up; "
        f"{common.load_note(load_start)}"
    )
    print(
        f"{'recipe':6s} {'dataset':20s} {'samples':>7s} {'epoch s':>8s} {'samples/s':>9s} "
        f"{'speed-up':>8s}  setup"
    )
    ratios = []
    for recipe in ("demo", "full"):
        r = results[recipe]
        p = r.cfg.dataset.params
        setup = (
            f"{p.image_size}px x {p.seq_len} x {p.in_chans}ch, cache {r.cfg.cache.size}, "
            f"batch {r.cfg.train.batch_size}, workers {r.cfg.num_workers}"
        )
        base = r.seconds["seed-style (DICOM)"]
        for name, seconds in r.seconds.items():
            print(
                f"{recipe:6s} {name:20s} {r.samples:7d} {seconds:8.2f} "
                f"{r.samples / seconds:9.1f} {base / seconds:7.1f}x  {setup}"
            )
        ratios.append(f"{recipe} {base / r.seconds['ours (uint8 cache)']:.1f}x")
        if r.model_seconds:
            base = r.model_seconds["seed-style (DICOM)"]
            for name, seconds in r.model_seconds.items():
                print(
                    f"{recipe:6s} {name:20s} {r.samples:7d} {seconds:8.2f} "
                    f"{r.samples / seconds:9.1f} {base / seconds:7.1f}x  data + model (bf16)"
                )
    print(
        f"SUMMARY bench_stage2_epoch: data-only epoch, cache vs seed-style DICOM: "
        f"{', '.join(ratios)} (goal >= 5x)"
    )


if __name__ == "__main__":
    main()
