"""Benchmark: training throughput of both stage models, fp32 vs bf16 autocast + channels_last.

Usage::

    python -m bench.bench_train [--steps 3] [--threads 2] [--quick]

Four cases, each model built exactly as train.py builds it (``utils.registry.build_model`` on a config
resolved by ``utils.config.load_config``, ``utils.engine.prepare_model``, the loss of the config,
train.py's ``build_optimizer`` and ``train_one_epoch``: autocast, backward, grad clipping, AdamW
and scheduler step):

- stage 1 ``vertebra_bbox_ratio``, demo profile (resnet18, 128 px, batch 32) and full profile
  (convnext_tiny, 384 px; batch 8 instead of 32 so a step takes seconds, not a minute);
- stage 2 ``fracture_seq``, demo profile (resnet18, 80 px x 8 slices, batch 8) and full profile
  (convnext_tiny, 224 px x 24 slices; batch 2 instead of 8).

Each case runs twice at the same batch size: ``train.amp=false train.channels_last=false`` (fp32)
and the configs' default ``amp=true channels_last=true`` (bf16 autocast on CPU). Inputs are one
random batch of the dataset's shapes and dtypes, reused every step (the data path is measured
by ``bench.bench_stage2_epoch``). After one warm-up step per variant, ``--steps`` steps are timed one by
one, alternating the variants so load from other processes hits both alike; the tables give
medians. ``--quick`` shrinks every case (32 px, 2 slices, batch 2, 1 step) as a smoke test.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import common
from train import train_one_epoch
from utils import cli
from utils.config import Config, load_config
from utils.engine import build_optimizer, needs_scaler, prepare_model, resolve_device
from utils.registry import build_loss, build_model
from utils.seed import seed_everything

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config" / "rsna"
VARIANTS = {
    "fp32": ["train.amp=false", "train.channels_last=false"],
    "bf16+CL": ["train.amp=true", "train.channels_last=true"],
}


@dataclass(frozen=True)
class Case:
    """One model to benchmark: a stage config, its profile, and extra overrides (batch size)."""

    name: str
    config: str
    profile: str
    overrides: tuple[str, ...] = ()


CASES = (
    Case("stage1 demo", "stage1_vertebra.yaml", "demo"),
    # The full profile's batch 32 at 384 px is too slow per fp32 step for a CPU benchmark.
    Case("stage1 full", "stage1_vertebra.yaml", "full", ("train.batch_size=8",)),
    Case("stage2 demo", "stage2_fracture.yaml", "demo"),
    Case("stage2 full", "stage2_fracture.yaml", "full", ("train.batch_size=2",)),
)
QUICK = (
    "dataset.params.image_size=32",
    "train.batch_size=2",
)
QUICK_STAGE2 = ("dataset.params.seq_len=2",)


def case_config(case: Case, variant: str, quick: bool) -> Config:
    """The resolved config of ``case`` with the precision ``variant`` (and quick sizes)."""
    overrides = [f"profile={case.profile}", "progress=false", *case.overrides, *VARIANTS[variant]]
    if quick:
        overrides += QUICK + (QUICK_STAGE2 if case.config.startswith("stage2") else ())
    return load_config(CONFIG_DIR / case.config, overrides)


def images_per_sample(cfg: Config) -> int:
    """Network input images per sample: 1 for stage 1, ``seq_len`` for stage 2."""
    return int(cfg.dataset.params.get("seq_len", 1))


def synthetic_batch(cfg: Config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One random CPU batch with the shapes and dtypes the stage's dataset yields.

    Stage 1: ``image`` (B, C, H, W) float32 in [-1, 1], ``z`` (B,), ``box`` (B, 4) valid
    normalised boxes, ``ratios`` (B, 7), ``vertebrae`` (B,) ones. Stage 2: ``image``
    (B, S, C, H, W) float32 in [-1, 1], ``target`` (B,) 0/1.
    """
    p, b = cfg.dataset.params, int(cfg.train.batch_size)
    size, chans = int(p.image_size), int(p.in_chans)
    if cfg.dataset.name == "vertebra_slices":
        corners = torch.rand(b, 2, 2, generator=generator).sort(dim=1).values  # (B, lo/hi, x/y)
        return {
            "image": torch.rand(b, chans, size, size, generator=generator) * 2 - 1,
            "z": torch.rand(b, generator=generator),
            "box": corners.flatten(1),
            "ratios": torch.rand(b, 7, generator=generator),
            "vertebrae": torch.ones(b),
        }
    if cfg.dataset.name == "vertebra_sequences":
        seq = images_per_sample(cfg)
        return {
            "image": torch.rand(b, seq, chans, size, size, generator=generator) * 2 - 1,
            "target": torch.randint(0, 2, (b,), generator=generator).float(),
        }
    raise ValueError(f"no synthetic batch for dataset '{cfg.dataset.name}'")


class Trainer:
    """A model, loss, optimizer and scheduler set up as train.py's ``_train_fold`` does."""

    def __init__(self, cfg: Config, steps: int):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.model = prepare_model(build_model(cfg), cfg, self.device)
        self.loss_fn = build_loss(cfg)
        self.opt, self.sched = build_optimizer(cfg, self.model, steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_scaler(cfg, self.device))

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on ``batch`` through train.py's epoch loop; returns seconds."""
        start = time.perf_counter()
        train_one_epoch(
            self.cfg,
            self.model,
            [batch],
            self.loss_fn,
            self.opt,
            self.sched,
            self.scaler,
            self.device,
        )
        return time.perf_counter() - start


def time_case(case: Case, steps: int, quick: bool) -> tuple[Config, dict[str, float]]:
    """Median seconds per training step of each precision variant of ``case``.

    Both variants get the same batch; after one warm-up step each, ``steps`` timed steps
    alternate between them.
    """
    configs = {v: case_config(case, v, quick) for v in VARIANTS}
    trainers = {v: Trainer(cfg, steps + 1) for v, cfg in configs.items()}
    batch = synthetic_batch(configs["fp32"], torch.Generator().manual_seed(0))
    for trainer in trainers.values():
        trainer.step(batch)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(steps):
        for v, trainer in trainers.items():
            times[v].append(trainer.step(batch))
    return configs["fp32"], {v: statistics.median(t) for v, t in times.items()}


def backbone(cfg: Config) -> str:
    """The model's timm backbone: ``model.params.encoder.backbone`` (or, in configs from before
    the encoder spec, ``model.params.backbone``)."""
    params = cfg.model.params
    return str(params.get("encoder", params)["backbone"])


def describe(cfg: Config) -> str:
    """``backbone size px [x S slices] x C ch, batch B``."""
    p = cfg.dataset.params
    seq = f" x {p.seq_len} sl" if "seq_len" in p else ""
    return f"{backbone(cfg)} {p.image_size}px{seq} x {p.in_chans}ch, batch {cfg.train.batch_size}"


def main() -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 step (smoke test)")
    args, load_start = common.start(parser)
    steps = 1 if args.quick else args.steps

    rows = []
    for case in CASES:
        cfg, seconds = time_case(case, steps, args.quick)
        rows.append((case, cfg, seconds))

    print(
        f"torch {torch.__version__}, {args.threads} threads, device "
        f"{resolve_device(rows[0][1].device)}; median of {steps} steps after 1 warm-up; "
        f"{common.load_note(load_start)}"
    )
    print(
        f"{'case':12s} {'setup':42s} {'fp32 s/step':>11s} {'samples/s':>9s} {'img/s':>7s} "
        f"{'bf16 s/step':>11s} {'samples/s':>9s} {'img/s':>7s} {'speed-up':>8s}"
    )
    ratios = []
    for case, cfg, seconds in rows:
        b, per = int(cfg.train.batch_size), images_per_sample(cfg)
        cols = "".join(
            f" {seconds[v]:11.3f} {b / seconds[v]:9.2f} {b * per / seconds[v]:7.1f}"
            for v in VARIANTS
        )
        ratio = seconds["fp32"] / seconds["bf16+CL"]
        ratios.append(f"{case.name} {ratio:.2f}x")
        print(f"{case.name:12s} {describe(cfg):42s}{cols} {ratio:7.2f}x")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak_gib:.1f} GiB")
    print(f"SUMMARY bench_train: bf16+channels_last vs fp32 at equal batch: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
