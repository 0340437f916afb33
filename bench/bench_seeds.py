"""Benchmark: a pipeline's demo recipe over several seeds, every headline metric as mean ± sd.

Usage (from the repository root)::

    python -m bench.bench_seeds --pipeline rsna --seeds 0 1 2            # training seeds varied
    python -m bench.bench_seeds --pipeline hipmri --seeds 0 1 2 --redraw # the data drawn again too

Each seed runs ``sh train.sh <pipeline>`` with ``PROFILE=demo`` into its own output folder
(``output/seeds/<pipeline>/seed<k>/``). By default the synthetic data set is drawn once (seed
0, the demo's) and the config ``seed`` varies, which seeds our torch stages (weights,
augmentation, sampling); nnU-Net's own training draws its randomness unseeded. ``--redraw`` also
draws the data set of each seed (``data/<pipeline>_seed<k>``), so the spread includes the
data's. Writes ``output/<pipeline>/seeds.{json,md}``: per seed and mean ± sd (sample sd,
n - 1) of each headline metric, read from each run's ``cv_report.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import common
from utils import cli, paths
from utils.io import write_text

ROOT = Path(__file__).resolve().parents[1]


def _rsna(r: dict) -> dict[str, float]:
    out = {
        "oof_metric": r["oof_metric"],
        "constant_prior": r["baseline_prior"],
        "ratio_to_prior": r["ratio_to_prior"],
        "noisy_or": r["baseline_noisy_or"],
        "oof_metric_raw": r["oof_metric_raw"],
        **{f"auc_{t}": v for t, v in r["per_target_auc"].items()},
    }
    for level, value in r["patient_level"]["oof_metric"].items():  # head vs noisy-OR, both final
        out[f"oof_metric_{level}"] = value
    for name in ("cross_style", "phantom"):  # checks on data the demo never trained on
        if name in r:
            out[f"{name}_metric"] = r[name]["metric"]
            out[f"{name}_ratio_to_prior"] = r[name]["metric"] / r[name]["baseline_prior"]
    return out


def _hipmri(r: dict) -> dict[str, float]:
    return {
        **{f"dice_{c}": v for c, v in r["dice"].items()},
        "dice_mean_fg": r["dice_mean_foreground"],
    }


def _fracatlas(r: dict) -> dict[str, float]:
    out = {k: r[k] for k in ("seg_dice", "seg_dice_all", "cls_auc", "cls_auc_mask_guided")}
    if None not in (r["cls_auc"], r["cls_auc_mask_guided"]):
        out["guidance_gain_auc"] = r["cls_auc_mask_guided"] - r["cls_auc"]
    return out


def _pancreas(r: dict) -> dict[str, float]:
    out = {"majority_baseline_macro_f1": r["majority_baseline_macro_f1"]}
    for trainer, m in r["trainers"].items():
        name = trainer.removeprefix("nnUNetTrainer")
        out.update({f"{name}_{k}": m[k] for k in ("macro_f1", "dsc_pancreas", "dsc_lesion")})
    return out


# Each pipeline's demo claim, as the numbers of its cv_report.json.
HEADLINES: dict[str, Callable[[dict], dict[str, float]]] = {
    "rsna": _rsna,
    "hipmri": _hipmri,
    "fracatlas": _fracatlas,
    "pancreas": _pancreas,
}


def run_seed(pipeline: str, seed: int, redraw: bool) -> tuple[dict[str, float], float]:
    """One demo run of ``pipeline`` with ``seed``: (headline metrics, seconds)."""
    output = ROOT / "output" / "seeds" / pipeline / f"seed{seed}"
    env = {**os.environ, "PROFILE": "demo", "OUTPUT": str(output), "PYTHON": sys.executable}
    cmd = ["sh", "train.sh", pipeline]
    if redraw:
        data = ROOT / "data" / f"{pipeline}_seed{seed}"
        if not data.exists():
            generator = [sys.executable, "-m", f"utils.{pipeline}.synthetic", "--out", str(data)]
            subprocess.run(
                [*generator, "--preset", "demo", "--seed", str(seed)], cwd=ROOT, check=True
            )
        cmd.append(str(data))
    start = time.perf_counter()
    subprocess.run([*cmd, f"seed={seed}"], cwd=ROOT, env=env, check=True)
    seconds = time.perf_counter() - start
    report = json.loads((output / pipeline / "cv_report.json").read_text())
    return HEADLINES[pipeline](report), seconds


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """metric -> {mean, sd, min, max} over the seeds (metrics missing in a seed are left out)."""
    names = sorted({k for m in per_seed.values() for k, v in m.items() if v is not None})
    out = {}
    for name in names:
        values = [m[name] for m in per_seed.values() if m.get(name) is not None]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        out[name] = {
            "mean": statistics.fmean(values),
            "sd": sd,
            "min": min(values),
            "max": max(values),
        }
    return out


def ranking(summary: dict[str, dict[str, float]], suffix: str) -> str:
    """The ``*<suffix>`` metrics (one per compared model) in order of their mean; a gap no larger
    than the larger of the two sds is called a tie, not a ranking."""
    rows = sorted(
        ((k.removesuffix(suffix), v) for k, v in summary.items() if k.endswith(suffix)),
        key=lambda kv: -kv[1]["mean"],
    )
    parts = [rows[0][0]] if rows else []
    for (_, a), (name, b) in zip(rows, rows[1:], strict=False):
        gap, sd = a["mean"] - b["mean"], max(a["sd"], b["sd"])
        parts.append(f"{'>' if gap > sd else '~'} {name}")
    return " ".join(parts)


def markdown(pipeline: str, result: dict) -> str:
    seeds = list(result["per_seed"])
    lines = [
        f"# {pipeline} demo over seeds {', '.join(map(str, seeds))}",
        "",
        f"{result['mode']}; {result['date']}; load average {result['load']}; "
        f"{', '.join(f'{s:.0f} s' for s in result['seconds'].values())} per run.",
        "",
        "| metric | mean ± sd | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for name, stats in result["summary"].items():
        cells = [result["per_seed"][s].get(name) for s in seeds]
        shown = " | ".join("n/a" if v is None else f"{v:.4f}" for v in cells)
        lines.append(f"| {name} | {stats['mean']:.4f} ± {stats['sd']:.4f} | {shown} |")
    if pipeline == "pancreas":  # the three trainers: ranked only where the gap exceeds the sd
        lines += [
            "",
            f"Macro-F1 ranking (> gap above the sd, ~ a tie): {ranking(result['summary'], '_macro_f1')}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--pipeline", required=True, choices=sorted(HEADLINES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--redraw", action="store_true", help="draw each seed's data set too")
    args, load_start = common.start(parser, argv, threads=int(os.environ.get("OMP_NUM_THREADS", 2)))
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        per_seed[seed], seconds[seed] = run_seed(args.pipeline, seed, args.redraw)
        print(f"seed {seed}: {json.dumps(per_seed[seed])}", flush=True)
    result = {
        "pipeline": args.pipeline,
        "mode": "data and training seed varied"
        if args.redraw
        else "training seed varied, data seed 0",
        "date": time.strftime("%Y-%m-%d"),
        "load": common.load_note(load_start),
        "seconds": seconds,
        "per_seed": per_seed,
        "summary": summarise(per_seed),
    }
    out = (
        paths.pipeline_dir({"output_dir": str(ROOT / "output"), "pipeline": args.pipeline})
        / "seeds"
    )
    write_text(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    write_text(markdown(args.pipeline, result), out.with_suffix(".md"))
    print(markdown(args.pipeline, result))
    return result


if __name__ == "__main__":
    main()
