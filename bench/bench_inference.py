"""Benchmark: end-to-end test-time inference (``utils.rsna.submit.test_chain``) per 300-slice CT study.

Usage::

    python -m bench.bench_inference [--slices 300] [--size 512] [--repeat 3] [--warmup 1]
        [--threads 2] [--stride 1] [--quick]

Writes the ``bench`` study of ``utils.rsna.synthetic`` (seed 0: 300 slices of 512 x 512, JPEG
Lossless SV1) as a TEST study, with a matching 8-row ``test.csv`` and a one-row ``train.csv``
(train priors; no vertebra is left without a prediction here, so their values do not matter),
into a temporary folder. For each recipe it saves one fold of every stage (stage 1, stage 2,
patient head) with random-init weights in the exact checkpoint format of train.py (timing does
not depend on the weights), then times ``utils.rsna.submit.test_chain``, the whole
``inference.py --split test`` path: DICOM read + uint8 cache (in the run's test folder,
``layout.test_prep_dir``), stage 1 on every slice, localisation, stage 2 on each vertebra,
patient head, submission.csv.

Recipes: ``demo`` (profile demo: resnet18, cache 160 px, stage 1 at 128 px, stage 2 80 px x 8)
and ``full`` (profile full: convnext_tiny, cache and stage 1 at 384 px, stage 2 224 px x 24).
Both set ``localize.vert_thresh=0.0`` and ``localize.ordered=false`` so every vertebra gets a
sequence from untrained stage-1 outputs and stage 2 costs what it does on a real study (7
sequences); the ordered decoding may drop vertebrae at threshold 0. Both run with
``num_workers=0`` (the full profile's 2 loader workers deadlock after in-process caching; see
``RUNTIME``).

Per step (the functions of ``utils.rsna.submit`` that test_chain calls, timed in place, each
call's time net of the timed calls inside it): read + cache (``ensure_cached``), loading the
fold models (``load_models``, also the one inside ``predict_stage1``), stage 1
(``predict_stage1``), localisation (``localize``), stage 2 and patient head (``predict_frame``
with the stage-2 / head config), and the rest (CSV writes, configs).
The cached volume is deleted before every run so each one reads the DICOM files again. Medians
of ``--repeat`` runs after ``--warmup`` untimed runs (the full recipe runs once after its
warm-up). ``--quick``: a 40-slice 128 x 128 study, one timed run, and the full recipe at
64 px x 4 slices.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import pandas as pd
import torch

from bench import common
from utils import cli, paths
from utils.checkpoint import save_checkpoint
from utils.config import Config, load_config, save_config
from utils.engine import build_optimizer
from utils.io import write_csv
from utils.registry import build_model
from utils.rsna import layout, submit
from utils.rsna.metric import TARGETS
from utils.rsna.synthetic.generator import PRESETS, plan_dataset, write_study
from utils.seed import seed_everything

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config" / "rsna"
STAGES = ("stage1_vertebra.yaml", "stage2_fracture.yaml", "patient_head.yaml")
# The functions of utils.rsna.submit that test_chain calls, timed in place, and the step each
# call is reported as: a name, or None for predict_frame, whose step is the stage of the config
# it is called with (stage 1 inside predict_stage1, then stage 2, then the patient head).
STEPS: dict[str, str | None] = {
    "ensure_cached": "read+cache",
    "load_models": "models",
    "predict_stage1": "stage 1",
    "localize": "localize",
    "predict_frame": None,
}
# Report columns, in chain order; then "other" and "total".
STEP_NAMES = ("read+cache", "models", "stage 1", "localize", "stage 2", "head")
# stages.<key> -> the step its predict_frame call is reported as.
STAGE_STEPS = {"vertebra": "stage 1", "fracture": "stage 2", "head": "head"}
# --quick shrinks the full recipe per stage (the patient head has no image params).
QUICK_FULL = {
    "stage1_vertebra.yaml": ("cache.size=64", "dataset.params.image_size=64"),
    "stage2_fracture.yaml": (
        "cache.size=64",
        "dataset.params.image_size=64",
        "dataset.params.seq_len=4",
    ),
    "patient_head.yaml": (),
}
# Every vertebra gets a sequence from untrained stage-1 outputs (see the module docstring), and
# no loader workers: after ensure_cached has resized 512 -> 384 px with OpenCV in this process,
# forked workers hang in utils.seed.worker_init_fn's cv2.setNumThreads(1).
# Untrained runs and no CV report: every slice a vertebra, the head as it is, no post-processing.
RUNTIME = (
    "localize.vert_thresh=0.0",
    "localize.ordered=false",
    "num_workers=0",
    "post.patient=head",
    "post.calibration=none",
    "post.shrink=0",
)


def make_test_data(root: Path, n_slices: int, size: int) -> str:
    """Write the bench study (``n_slices`` of ``size`` px) as ``root/test_images/<uid>`` with
    ``test.csv`` (8 rows) and ``train.csv`` (its own labels, for the priors); returns its uid."""
    preset = replace(PRESETS["bench"], rows=size, n_slices=(n_slices, n_slices))
    (spec,) = plan_dataset(preset, seed=0)
    spec = replace(spec, split="test")
    write_study(spec, preset, 0, root)
    labels = [int(any(spec.labels)), *spec.labels]
    write_csv(
        pd.DataFrame([[spec.uid, *labels]], columns=["StudyInstanceUID", *TARGETS]),
        layout.labels_csv(root),
    )
    rows = [(f"{spec.uid}_{t}", spec.uid, t) for t in [*TARGETS[1:], TARGETS[0]]]
    write_csv(
        pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"]),
        layout.test_csv(root),
    )
    return spec.uid


def recipe_configs(
    recipe: str, data: Path, out: Path, quick: bool, stride: int = 1
) -> list[Config]:
    """The resolved configs of stage 1, stage 2 and the patient head for ``recipe``."""
    common = [f"profile={recipe}", f"data_dir={data}", f"output_dir={out}", "progress=false"]
    common += [f"submit.stage1_stride={stride}", "submit.budget_s=null"]
    configs = []
    for name in STAGES:
        extra = QUICK_FULL[name] if quick and recipe == "full" else ()
        configs.append(load_config(CONFIG_DIR / name, [*common, *RUNTIME, *extra]))
    return configs


def save_untrained_fold(cfg: Config, fold: int = 0) -> Path:
    """Save a random-init model of ``cfg`` as fold ``fold``'s best.pth, as train.py writes it."""
    seed_everything(cfg.seed + 1000 * fold)
    model = build_model(cfg)
    opt, sched = build_optimizer(cfg, model, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": cfg.train.epochs - 1,
        "best_metric": float("nan"),
        "metric": float("nan"),
        "history": [],
        "config": cfg.to_dict(),
        "fold": fold,
        "seed": cfg.seed,
    }
    save_config(cfg, paths.run_dir(cfg, fold) / "config.yaml")
    return save_checkpoint(state, paths.checkpoint_path(cfg, fold, "best"))


def stage_step(cfg: Config) -> str:
    """The step a ``predict_frame(cfg, ...)`` call belongs to: the chain stage ``cfg`` runs."""
    for key, exp in cfg.stages.items():
        if exp and exp == cfg.exp_name:
            return STAGE_STEPS[key]
    raise ValueError(f"'{cfg.exp_name}' is not a stage of the chain {dict(cfg.stages)}")


@contextlib.contextmanager
def timed_calls(module: ModuleType, steps: dict[str, str | None]) -> Iterator[dict[str, float]]:
    """Replace ``module.<name>`` by a wrapper adding its wall seconds to the yielded dict, under
    ``steps[name]`` (None: the step of its config argument, see :func:`stage_step`).

    Exclusive times: a timed call made inside another one (``load_models`` and ``predict_frame``
    inside ``predict_stage1``) counts for its own step only, so the steps add up to the time
    spent in the timed functions.
    """
    seconds = dict.fromkeys(STEP_NAMES, 0.0)
    originals = {name: getattr(module, name) for name in steps}
    inner: list[float] = []  # per active timed call: seconds spent in timed calls inside it

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            step = steps[name] or stage_step(args[0])
            inner.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                seconds[step] += elapsed - inner.pop()
                if inner:
                    inner[-1] += elapsed

        return timed

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield seconds
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def run_chain(s2: Config, uid: str) -> tuple[dict[str, float], int]:
    """One uncached ``test_chain`` run: seconds per step (+ ``other``, ``total``) and the number
    of vertebra sequences stage 2 predicted."""
    layout.volume_path(layout.test_prep_dir(s2), uid).unlink(missing_ok=True)
    out = layout.submission_csv(s2)
    with timed_calls(submit, STEPS) as seconds:
        start = time.perf_counter()
        sub = submit.test_chain(s2, out)
        total = time.perf_counter() - start
    if len(sub) != len(TARGETS) or sub.fractured.isna().any():
        raise RuntimeError(f"{out}: expected {len(TARGETS)} complete rows, got {len(sub)}")
    steps = dict(seconds)
    steps["other"] = total - sum(seconds.values())
    steps["total"] = total
    n_seq = len(pd.read_csv(layout.stage2_labels_csv(s2, "test")))
    return steps, n_seq


@dataclass(frozen=True)
class RecipeResult:
    """Median seconds per step of one recipe and what it ran."""

    stage1: Config
    stage2: Config
    seconds: dict[str, float]
    sequences: int  # (study, vertebra) sequences stage 2 predicted


def time_recipe(
    recipe: str,
    data: Path,
    out: Path,
    uid: str,
    repeat: int,
    warmup: int,
    quick: bool,
    stride: int = 1,
) -> RecipeResult:
    """Median step seconds of ``repeat`` test_chain runs after ``warmup`` untimed ones."""
    s1, s2, head = recipe_configs(recipe, data, out, quick, stride)
    for cfg in (s1, s2, head):
        save_untrained_fold(cfg)
    for _ in range(warmup):
        run_chain(s2, uid)
    runs = [run_chain(s2, uid) for _ in range(repeat)]
    sequences = runs[-1][1]
    if sequences != 7:
        log.warning("%s: stage 2 predicted %d vertebrae instead of 7", recipe, sequences)
    seconds = {k: statistics.median(steps[k] for steps, _ in runs) for k in runs[0][0]}
    return RecipeResult(s1, s2, seconds, sequences)


def backbone(cfg: Config) -> str:
    """The model's timm backbone: ``model.params.encoder.backbone`` (or, in configs from before
    the encoder spec, ``model.params.backbone``)."""
    params = cfg.model.params
    return str(params.get("encoder", params)["backbone"])


def describe(s1: Config, s2: Config) -> str:
    """``cache C px; stage 1 backbone S px; stage 2 backbone S px x L``."""
    p1, p2 = s1.dataset.params, s2.dataset.params
    return (
        f"cache {s1.cache.size}px; stage 1 {backbone(s1)} {p1.image_size}px; "
        f"stage 2 {backbone(s2)} {p2.image_size}px x {p2.seq_len}"
    )


def main() -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the demo recipe")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--quick", action="store_true", help="small study and sizes (smoke test)")
    parser.add_argument("--stride", type=int, default=1, help="submit.stage1_stride (test-time)")
    args, load_start = common.start(parser)
    n_slices, size = (40, 128) if args.quick else (args.slices, args.size)
    repeat = 1 if args.quick else args.repeat

    results: dict[str, RecipeResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        start = time.perf_counter()
        uid = make_test_data(data, n_slices, size)
        written = time.perf_counter() - start
        for recipe, runs in (("demo", repeat), ("full", 1)):
            out = Path(tmp) / f"out_{recipe}"
            results[recipe] = time_recipe(
                recipe, data, out, uid, runs, args.warmup, args.quick, args.stride
            )

    print(
        f"study: utils.rsna.synthetic bench, {n_slices} slices {size}x{size} JPEG Lossless SV1 "
        f"(written in {written:.0f} s); stage-1 stride {args.stride}; torch {args.threads} threads; demo median of "
        f"{repeat}, full 1 run, after {args.warmup} warm-up; "
        f"{common.load_note(load_start)}"
    )
    keys = list(results["demo"].seconds)
    print(f"{'recipe':6s} " + " ".join(f"{k:>10s}" for k in keys) + "  sequences  setup")
    for recipe, r in results.items():
        cols = " ".join(f"{r.seconds[k]:10.2f}" for k in keys)
        print(f"{recipe:6s} {cols}  {r.sequences:9d}  {describe(r.stage1, r.stage2)}")
    demo, full = results["demo"].seconds["total"], results["full"].seconds["total"]
    print(
        f"SUMMARY bench_inference: {n_slices}-slice {size}px study, demo {demo:.1f} s "
        f"(goal <= 15 s: {'met' if demo <= 15 else 'MISSED'}), full {full:.1f} s"
    )


if __name__ == "__main__":
    main()
