"""Train one stage, fold by fold: ``python train.py --CFG config/<pipeline>/<stage>.yaml [--fold k|all] [key=value ...]``.

Everything stage-specific comes from the config: the dataset, model and loss are built from
registries by name (``utils/<pipeline>/datasets.py``, ``models/<pipeline>/``,
``utils/<pipeline>/losses.py``). Per fold the run folder ``output/<pipeline>/<exp>/fold<k>/``
receives ``config.yaml``, ``train.log``, ``metrics.csv``, ``curves.png`` and atomic ``last.pth`` /
``best.pth`` checkpoints that carry the resolved config and the seed.

With ``resume: auto`` a fold continues from ``last.pth`` when the saved config matches (a
finished fold is skipped); a different config is an error naming the differing keys.

Multi-process: ``torchrun --nproc_per_node=N train.py --CFG ...`` trains with DDP (NCCL on CUDA,
gloo on CPU; ``utils/distributed.py``); ``train.batch_size`` stays the global batch, split over
the processes; only rank 0 writes files; validation outputs are gathered in table order.
See docs/scaling.md.
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

from utils import distributed, paths
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import Config, ConfigError, diff_configs, load_config, save_config
from utils.distributed import DistInfo
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
from utils.errors import user_errors
from utils.folds import load_folds, with_folds
from utils.io import write_csv
from utils.plots import plot_curves
from utils.registry import (
    DATASETS,
    build_dataset,
    build_loss,
    build_model,
    check_components,
    load_pipeline,
)
from utils.seed import process_rank, seed_everything
from utils.tracking import Tracker, make_tracker

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
def train_one_epoch(
    cfg, model, loader, loss_fn, opt, sched, scaler, device, quiet: bool = False
) -> float:
    """One pass over ``loader``; returns the mean of the batch losses (of this process)."""
    model.train()
    total, n = 0.0, 0
    limit = cfg.train.max_train_batches
    bar = tqdm(loader, desc="train", leave=False, disable=quiet or progress_off(cfg))
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


def run_fold(
    cfg: Config,
    fold: int,
    device: torch.device | None = None,
    info: DistInfo = distributed.SINGLE,
) -> float | None:
    """Train one fold (or skip it when already trained); returns its best validation metric.

    Under DDP every rank reads the same ``last.pth`` (so all skip or resume alike); only rank 0
    writes the run folder.
    """
    device = device or resolve_device(cfg.device)
    run = paths.run_dir(cfg, fold)
    if info.main:
        run.mkdir(parents=True, exist_ok=True)
    state = resume_state(cfg, run)
    if state is not None and state["epoch"] + 1 >= cfg.train.epochs:
        log.info("fold %d already trained (%d epochs) in %s: skipping", fold, cfg.train.epochs, run)
        return state["best_metric"]
    handler = add_file_log(run / "train.log") if info.main else None
    tracker = make_tracker(cfg, run, fold) if info.main else Tracker()
    try:
        return _train_fold(cfg, fold, run, state, device, info, tracker)
    finally:
        tracker.close()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _train_fold(
    cfg: Config,
    fold: int,
    run: Path,
    state: dict | None,
    device: torch.device,
    info: DistInfo,
    tracker: Tracker,
) -> float:
    if info.main:
        save_config(cfg, run / "config.yaml")
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

    # DDP: each process loads its share of the global batch; the ranks' k-th batches together
    # are the single process's k-th batch (utils/distributed.py: train_sampler).
    batch = distributed.per_rank_batch(cfg.train.batch_size, info)
    sampler = distributed.train_sampler(len(train_ds), cfg.seed, info)
    val_sampler = distributed.val_sampler(len(val_ds), info)
    log.info(
        "global batch %d (%d process%s x %d), peak lr %g",
        cfg.train.batch_size,
        info.world,
        "es" if info.enabled else "",
        batch,
        cfg.train.lr,
    )

    model = prepare_model(build_model(cfg), cfg, device)
    loss_fn = build_loss(cfg)
    steps = len(make_loader(cfg, train_ds, True, 0, sampler, batch))
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
    model = distributed.wrap_model(model, info, device)  # after loading: plain state-dict keys
    local = unwrap_model(model) if info.enabled else model  # validation needs no collectives
    sign = 1 if cfg.train.best_mode == "min" else -1
    evaluate = DATASETS.get(cfg.dataset.name).evaluate

    for epoch in range(start, cfg.train.epochs):
        t0 = time.perf_counter()
        seed_everything(cfg.seed + 1000 * fold + epoch)
        loader = make_loader(cfg, train_ds, True, epoch, sampler, batch)
        train_loss = train_one_epoch(
            cfg, model, loader, loss_fn, opt, sched, scaler, device, quiet=not info.main
        )
        distributed.sync_buffers(local, info)  # validate with the BatchNorm statistics saved
        val_loader = make_loader(cfg, val_ds, False, 0, val_sampler)
        outs, val_loss = predict(cfg, local, val_loader, device, loss_fn, quiet=not info.main)
        # DDP: the mean over ranks, and rank 0 joins the validation blocks in table order.
        train_loss = distributed.mean_over_ranks(train_loss, info)
        gathered = distributed.gather_predictions(outs, val_loss, len(val_loader.sampler), info)
        row = None
        if info.main:
            outs, val_loss = gathered
            row = {
                "epoch": epoch + 1,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": train_loss,
                "val_loss": val_loss,
            }
            row.update({f"val_{k}": v for k, v in evaluate(outs, val_ds.table).items()})
            row["seconds"] = round(time.perf_counter() - t0, 1)
        row = distributed.broadcast(row, info)
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
        if info.main:
            tracker.log(row, epoch + 1)
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
            plot_curves(
                pd.DataFrame(history), run / "curves.png", title=f"{cfg.exp_name} fold {fold}"
            )
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
    # Under torchrun only rank 0 logs (the others show warnings and errors).
    level = logging.INFO if process_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.CFG, args.overrides)
        check_components(cfg)  # before any run folder exists
    except (ConfigError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    except KeyError as err:
        raise SystemExit(f"error: {err.args[0]}") from None
    if not paths.folds_csv(cfg).is_file():
        raise SystemExit(
            f"error: {paths.folds_csv(cfg)} not found; run "
            f"python -m utils.fold_split --CFG {args.CFG} first"
        )
    info, device = distributed.setup(resolve_device(cfg.device))
    try:
        with user_errors():
            results = {k: run_fold(cfg, k, device, info) for k in folds_to_run(cfg, args.fold)}
        distributed.barrier(info)  # rank 0 has written the last checkpoint when torchrun returns
    finally:
        distributed.teardown(info)
    log.info(
        "best %s per fold: %s", cfg.train.best_metric, {k: round(v, 5) for k, v in results.items()}
    )


if __name__ == "__main__":
    main()
