"""The experiment log: every finished ``train.py`` fold and every CV report adds one row to
``<output_dir>/<pipeline>/experiments.csv``, the table a competitor keeps of each experiment's
validation and CV metric beside the config that produced it.

``python -m utils.experiments [--pipeline P] [--sort METRIC] [output_dir=D]`` prints it (every
pipeline with a log when ``--pipeline`` is not given). ``--sort`` takes a metric name of the
``metric`` column (those rows only, best first) or a column name.

Columns (``COLUMNS``): ``time`` (UTC), ``pipeline``, ``stage`` (the config file's stem),
``exp_name``, ``fold`` (``cv`` for a report), ``commit`` (``-dirty``: tracked files were
modified), ``config_hash`` (of the resolved config without its runtime keys and name: equal
hashes train the same thing), ``overrides`` (as given on the command line), ``metric`` and ``mode`` (its name
and whether lower or higher is better), ``best`` (a fold's best validation value,
``train.best_metric``), ``cv_metric`` (a report's headline value), ``seconds`` (a fold: its
epochs' seconds, resumed sessions included; a report: the OOF pass and the report), ``device``.
A rerun that skips a finished fold adds no row; a fold stopped by ``train.stop_after`` adds its
row when a later run finishes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from utils import cli, paths
from utils.config import Config, comparable, load_config, thaw
from utils.errors import InputError
from utils.io import append_row, read_csv

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    "time",
    "pipeline",
    "stage",
    "exp_name",
    "fold",
    "commit",
    "config_hash",
    "overrides",
    "metric",
    "mode",
    "best",
    "cv_metric",
    "seconds",
    "device",
)
CV_FOLD = "cv"  # the fold column of a CV report's row


@dataclass(frozen=True)
class Invocation:
    """The command a row comes from: the stage config file's stem and the overrides given."""

    stage: str
    overrides: tuple[str, ...] = ()

    @classmethod
    def of(cls, args: argparse.Namespace) -> Invocation:
        """From a ``cli.parser`` namespace (``--CFG`` and the trailing overrides)."""
        return cls(Path(args.CFG).stem, tuple(args.overrides))


@dataclass(frozen=True)
class CvResult:
    """What a CV report (a pipeline's ``after_oof`` hook) returns: the line printed after the OOF
    pass and the headline metric the experiment log records."""

    summary: str
    metric: str  # e.g. oof_metric, oof_auc
    value: float
    mode: str  # min | max: which way is better


@lru_cache(maxsize=1)
def commit() -> str:
    """The repository's short commit, ``-dirty`` when tracked files differ from it; ``unknown``
    outside a git checkout (e.g. a Kaggle code bundle)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:  # no git on this machine
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def config_hash(cfg: Config) -> str:
    """10 hex digits of the SHA-1 of the config's comparable keys (utils.config.comparable)
    but its name: one recipe has one hash under any ``exp_name``. An ensemble's members and fit
    method count too (runtime keys for a trained stage, what an ensemble is)."""
    keys = comparable(cfg, ("exp_name",))
    if cfg.get("ensemble"):
        keys |= {"ensemble": thaw(cfg["ensemble"]), "ensemble_fit": thaw(cfg["ensemble_fit"])}
    text = json.dumps(keys, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def device_name(device: torch.device, world: int = 1) -> str:
    """``cpu``, ``cuda:0 (NVIDIA H100 80GB HBM3)``; `` x4`` for 4 DDP processes."""
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return name + (f" x{world}" if world > 1 else "")


def _append(cfg: Config, invocation: Invocation, **fields) -> None:
    row = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "pipeline": cfg["pipeline"],
        "stage": invocation.stage,
        "exp_name": cfg["exp_name"],
        "commit": commit(),
        "config_hash": config_hash(cfg),
        "overrides": " ".join(invocation.overrides),
        **fields,
    }
    append_row({c: row.get(c) for c in COLUMNS}, paths.experiments_csv(cfg))


def log_fold(
    cfg: Config, fold: int, run: Path, invocation: Invocation, device: torch.device, world: int = 1
) -> bool:
    """Add the row of fold ``fold`` from its ``metrics.csv`` in ``run`` once it has all
    ``train.epochs`` epochs; False (no row) for a run stopped early (``train.stop_after``)."""
    history = read_csv(run / "metrics.csv")
    if len(history) < cfg.train.epochs:
        return False
    values = history[cfg.train.best_metric]
    _append(
        cfg,
        invocation,
        fold=fold,
        metric=cfg.train.best_metric,
        mode=cfg.train.best_mode,
        best=values.min() if cfg.train.best_mode == "min" else values.max(),
        seconds=round(float(history["seconds"].sum()), 1),
        device=device_name(device, world),
    )
    return True


def log_report(
    cfg: Config, invocation: Invocation, result: CvResult, seconds: float, device: str
) -> None:
    """Add the row of a CV report on the OOF predictions of ``cfg``'s experiment (``device``:
    :func:`device_name` of where the OOF pass ran)."""
    _append(
        cfg,
        invocation,
        fold=CV_FOLD,
        metric=result.metric,
        mode=result.mode,
        cv_metric=result.value,
        seconds=round(seconds, 1),
        device=device,
    )


# ---- the table ----------------------------------------------------------------------------------
def read_logs(output_dir: str, pipeline: str | None) -> pd.DataFrame:
    """The experiment log of ``pipeline``, or of every pipeline under ``output_dir`` (None)."""
    names = [pipeline] if pipeline else sorted(p.name for p in Path(output_dir).glob("*/"))
    logs = [paths.experiments_csv({"output_dir": output_dir, "pipeline": n}) for n in names]
    found = [p for p in logs if p.is_file()]
    if not found:
        where = logs[0] if pipeline else f"{output_dir}/<pipeline>/"
        raise InputError(f"no experiment log in {where}: train.py adds a row per finished fold")
    frames = [read_csv(p, dtype=str, keep_default_na=False) for p in found]
    return pd.concat(frames, ignore_index=True)


def sort_rows(log: pd.DataFrame, key: str | None) -> pd.DataFrame:
    """``log`` in file order (``key`` None), the rows of metric ``key`` best first, or sorted by
    column ``key`` (numerically where it is a number)."""
    if key is None:
        return log
    if key in set(log["metric"]):
        rows = log[log["metric"] == key]
        value = pd.to_numeric(rows["best"].where(rows["best"] != "", rows["cv_metric"]))
        ascending = (rows["mode"] == "min").to_numpy()
        order = value.where(ascending, -value).sort_values(kind="stable").index
        return rows.loc[order]
    if key in log.columns:
        numeric = pd.to_numeric(log[key], errors="coerce")
        by = numeric if numeric.notna().all() else log[key]
        return log.loc[by.sort_values(kind="stable").index]
    metrics = sorted(set(log["metric"]) - {""})
    raise InputError(f"--sort {key}: not a metric ({', '.join(metrics)}) nor a column")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None)
    parser.add_argument("--pipeline", default=None, help="one pipeline (default: every log)")
    parser.add_argument("--sort", default=None, metavar="METRIC", help="metric name or column")
    args = parser.parse_intermixed_args(argv)
    with cli.running():
        output_dir = load_config(None, args.overrides).output_dir
        log = sort_rows(read_logs(output_dir, args.pipeline), args.sort)
    shown = log[[c for c in log.columns if c != "overrides"] + ["overrides"]]  # the long one last
    for column in ("best", "cv_metric"):  # the file keeps every digit; 4 decimals to read
        values = pd.to_numeric(shown[column], errors="coerce")
        shown = shown.assign(**{column: values.map("{:.4f}".format).where(values.notna(), "")})
    with pd.option_context("display.max_colwidth", 80):
        print(shown.to_string(index=False, justify="left") if len(log) else "(no rows)")


if __name__ == "__main__":
    main()
