"""Train one stage, fold by fold: ``python train.py --CFG config/<pipeline>/<stage>.yaml [--fold k|all] [key=value ...]``.

Everything stage-specific comes from the config: the dataset, model and loss are built from
registries by name (``utils/<pipeline>/datasets.py``, ``models/<pipeline>/``,
``utils/<pipeline>/losses.py``). Per fold the run folder ``output/<pipeline>/<exp>/fold<k>/``
receives ``config.yaml``, ``train.log``, ``metrics.csv``, ``curves.png`` and atomic ``last.pth`` /
``best.pth`` checkpoints that carry the resolved config and the seed.

With ``resume: auto`` a fold continues from ``last.pth`` when the saved config matches (a
finished fold is skipped); a different config is an error naming the differing keys.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from utils import paths
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import Config, ConfigError, diff_configs, load_config, save_config
from utils.engine import (
    autocast,
    make_loader,
    needs_scaler,
    predict,
    prepare_model,
    progress_off,
    resolve_device,
    to_device,
    unwrap_model,
)
from utils.folds import load_folds, with_folds
from utils.io import write_csv
from utils.plots import plot_curves
from utils.registry import DATASETS, build_dataset, build_loss, build_model, load_pipeline
from utils.seed import seed_everything

log = logging.getLogger("train")


# ---- setup --------------------------------------------------------------------------------------
def split_table(cfg: Config, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stage's table split by the shared fold file: (train rows, validation rows of ``fold``)."""
    id_col = load_pipeline(cfg.pipeline).id_col
    table = DATASETS.get(cfg.dataset.name).load_table(cfg)
    table = with_folds(table, load_folds(paths.folds_csv(cfg), id_col), id_col)
    if table.empty:
        raise SystemExit(
            f"error: no rows of {cfg.dataset.name} have a fold in {paths.folds_csv(cfg)}"
        )
    train, val = table[table.fold != fold], table[table.fold == fold]
    if train.empty or val.empty:
        raise SystemExit(
            f"error: fold {fold} leaves no {'training' if train.empty else 'validation'} rows"
        )
    return train, val


def build_optimizer(cfg: Config, model: torch.nn.Module, steps_per_epoch: int):
    """AdamW (no decay on biases and norms) + linear warm-up and cosine decay, stepped per batch."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.train.lr,
    )
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    floor = cfg.train.min_lr / cfg.train.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---- epochs -------------------------------------------------------------------------------------
def train_one_epoch(cfg, model, loader, loss_fn, opt, sched, scaler, device) -> float:
    model.train()
    total, n = 0.0, 0
    limit = cfg.train.max_train_batches
    bar = tqdm(loader, desc="train", leave=False, disable=progress_off(cfg))
    for i, batch in enumerate(bar):
        if limit is not None and i >= limit:
            break
        batch = to_device(batch, device, cfg.train.channels_last)
        with autocast(cfg, device):
            loss = loss_fn(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        total += loss.item()
        n += 1
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


# ---- one fold -----------------------------------------------------------------------------------
def add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def resume_state(cfg: Config, run: Path) -> dict | None:
    """The ``last.pth`` state to continue from, None for a fresh start; error on a config mismatch."""
    last = run / "last.pth"
    if cfg.resume == "never" or not last.is_file():
        return None
    state = load_checkpoint(last)
    changed = diff_configs(state["config"], cfg.to_dict())
    if changed:
        raise SystemExit(
            f"error: {last} was trained with a different config ({', '.join(changed)}); "
            "use another exp_name/output_dir, delete the run, or pass resume=never"
        )
    log.info("resuming from %s (epoch %d done)", last, state["epoch"] + 1)
    return state


def run_fold(cfg: Config, fold: int) -> float | None:
    """Train one fold (or skip it when already trained); returns its best validation metric."""
    run = paths.run_dir(cfg, fold)
    run.mkdir(parents=True, exist_ok=True)
    state = resume_state(cfg, run)
    if state is not None and state["epoch"] + 1 >= cfg.train.epochs:
        log.info("fold %d already trained (%d epochs) in %s: skipping", fold, cfg.train.epochs, run)
        return state["best_metric"]
    handler = add_file_log(run / "train.log")
    try:
        return _train_fold(cfg, fold, run, state)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _train_fold(cfg: Config, fold: int, run: Path, state: dict | None) -> float:
    save_config(cfg, run / "config.yaml")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed + 1000 * fold)
    train_rows, val_rows = split_table(cfg, fold)
    train_ds, val_ds = build_dataset(cfg, train_rows, True), build_dataset(cfg, val_rows, False)
    log.info(
        "fold %d: %d train / %d val samples, device %s, seed %d",
        fold,
        len(train_ds),
        len(val_ds),
        device,
        cfg.seed,
    )

    model = prepare_model(build_model(cfg), cfg, device)
    loss_fn = build_loss(cfg)
    steps = len(make_loader(cfg, train_ds, True, 0))
    if cfg.train.max_train_batches is not None:
        steps = min(steps, cfg.train.max_train_batches)
    opt, sched = build_optimizer(cfg, model, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler(cfg, device))
    history: list[dict] = []
    start, best = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best, history = state["epoch"] + 1, state["best_metric"], state["history"]
    sign = 1 if cfg.train.best_mode == "min" else -1
    evaluate = DATASETS.get(cfg.dataset.name).evaluate

    for epoch in range(start, cfg.train.epochs):
        t0 = time.perf_counter()
        seed_everything(cfg.seed + 1000 * fold + epoch)
        train_loss = train_one_epoch(
            cfg, model, make_loader(cfg, train_ds, True, epoch), loss_fn, opt, sched, scaler, device
        )
        outs, val_loss = predict(cfg, model, make_loader(cfg, val_ds, False, 0), device, loss_fn)
        row = {
            "epoch": epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": train_loss,
            "val_loss": val_loss,
        }
        row.update({f"val_{k}": v for k, v in evaluate(outs, val_ds.table).items()})
        row["seconds"] = round(time.perf_counter() - t0, 1)
        history.append(row)
        if cfg.train.best_metric not in row:
            raise SystemExit(
                f"error: train.best_metric '{cfg.train.best_metric}' not among {sorted(row)}"
            )
        value = row[cfg.train.best_metric]
        improved = best is None or sign * value < sign * best
        best = value if improved else best
        log.info(
            "fold %d epoch %d/%d %s%s",
            fold,
            epoch + 1,
            cfg.train.epochs,
            " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
            " *" if improved else "",
        )
        ckpt = {
            "model": unwrap_model(model).state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_metric": best,
            "metric": value,
            "history": history,
            "config": cfg.to_dict(),
            "fold": fold,
            "seed": cfg.seed,
        }
        save_checkpoint(ckpt, run / "last.pth")
        if improved:
            save_checkpoint(ckpt, run / "best.pth")
        write_csv(pd.DataFrame(history), run / "metrics.csv")
        plot_curves(pd.DataFrame(history), run / "curves.png", title=f"{cfg.exp_name} fold {fold}")
        if cfg.train.stop_after is not None and epoch + 1 - start >= cfg.train.stop_after:
            log.info(
                "stopping after %d epochs (train.stop_after); resume: auto continues",
                cfg.train.stop_after,
            )
            break
    log.info("fold %d done: best %s = %.5g", fold, cfg.train.best_metric, best)
    return best


def folds_to_run(cfg: Config, fold: str) -> list[int]:
    id_col = load_pipeline(cfg.pipeline).id_col
    available = sorted(load_folds(paths.folds_csv(cfg), id_col)["fold"].unique().tolist())
    if fold == "all":
        return available
    if not fold.isdigit() or int(fold) not in available:
        raise SystemExit(f"error: --fold must be 'all' or one of {available}, got {fold!r}")
    return [int(fold)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--CFG", required=True, help="stage config, e.g. config/rsna/stage1_vertebra.yaml"
    )
    parser.add_argument(
        "--fold", default="all", help="fold number or 'all' (default: every fold in sequence)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.CFG, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if not paths.folds_csv(cfg).is_file():
        raise SystemExit(
            f"error: {paths.folds_csv(cfg)} not found; run "
            f"python -m utils.fold_split --CFG {args.CFG} first"
        )
    results = {k: run_fold(cfg, k) for k in folds_to_run(cfg, args.fold)}
    log.info(
        "best %s per fold: %s", cfg.train.best_metric, {k: round(v, 5) for k, v in results.items()}
    )


if __name__ == "__main__":
    main()
