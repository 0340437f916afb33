"""Train one stage, fold by fold: ``python train.py --CFG config/<pipeline>/<stage>.yaml [--fold k|all] [key=value ...]``.

Everything stage-specific comes from the config: the dataset, model and loss are built from
registries by name (``utils/<pipeline>/datasets.py``, ``models/<pipeline>/``,
``utils/<pipeline>/losses.py``). Per fold the run folder ``output/<pipeline>/<exp>/fold<k>/``
receives ``config.yaml``, ``train.log``, ``metrics.csv``, ``curves.png`` and atomic ``last.pth`` /
``best.pth`` checkpoints that carry the resolved config and the seed (``best.pth`` without the
optimizer, scheduler and scaler state that only resuming from ``last.pth`` needs).

With ``resume: auto`` a fold continues from ``last.pth`` when the saved config matches (a
finished fold is skipped); a different config is an error naming the differing keys.

Multi-process: ``torchrun --nproc_per_node=N train.py --CFG ...`` trains with DDP (NCCL on CUDA,
gloo on CPU; ``utils/distributed.py``); ``train.batch_size`` stays the global batch, split over
the processes; only rank 0 writes files; validation outputs are gathered in table order.
See docs/scaling.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from utils import cli, distributed, experiments, paths
from utils.checkpoint import resume_state, save_checkpoint
from utils.config import Config, save_config
from utils.distributed import DistInfo
from utils.engine import (
    autocast,
    build_optimizer,
    enable_grad_checkpointing,
    make_loader,
    needs_scaler,
    predict,
    prepare_model,
    progress_off,
    resolve_device,
    to_device,
    unwrap_model,
)
from utils.errors import InputError
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
from utils.seed import seed_everything
from utils.tracking import Tracker, make_tracker

log = logging.getLogger("train")
# Checkpoint entries only resuming reads; best.pth leaves them out.
RESUME_ONLY = ("optimizer", "scheduler", "scaler")


# ---- setup --------------------------------------------------------------------------------------
def split_table(cfg: Config, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stage's table split by the shared fold file: (train rows, validation rows of ``fold``)."""
    id_col = load_pipeline(cfg.pipeline).id_col
    table = DATASETS.get(cfg.dataset.name).load_table(cfg)
    table = with_folds(table, load_folds(paths.folds_csv(cfg), id_col), id_col)
    if table.empty:
        raise InputError(f"no rows of {cfg.dataset.name} have a fold in {paths.folds_csv(cfg)}")
    train, val = table[table.fold != fold], table[table.fold == fold]
    if train.empty or val.empty:
        raise InputError(
            f"fold {fold} leaves no {'training' if train.empty else 'validation'} rows"
        )
    return train, val


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
def run_fold(
    cfg: Config,
    fold: int,
    invocation: experiments.Invocation,
    device: torch.device | None = None,
    info: DistInfo = distributed.SINGLE,
) -> float | None:
    """Train one fold (or skip it when already trained); returns its best validation metric.

    Under DDP every rank reads the same ``last.pth`` (so all skip or resume alike); only rank 0
    writes the run folder and, once the fold is finished, its row of the experiment log.
    """
    device = device or resolve_device(cfg.device)
    run = paths.run_dir(cfg, fold)
    if info.main:
        run.mkdir(parents=True, exist_ok=True)
    state = resume_state(cfg, run)
    if state is not None and state["epoch"] + 1 >= cfg.train.epochs:
        log.info("fold %d already trained (%d epochs) in %s: skipping", fold, cfg.train.epochs, run)
        return state["best_metric"]
    handler = cli.add_file_log(run / "train.log") if info.main else None
    tracker = make_tracker(cfg, run, fold) if info.main else Tracker()
    try:
        best = _train_fold(cfg, fold, run, state, device, info, tracker)
    finally:
        tracker.close()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if info.main:
        experiments.log_fold(cfg, fold, run, invocation, device, info.world)
    return best


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
    if cfg.train.grad_checkpointing:
        log.info("gradient checkpointing in %d timm model(s)", enable_grad_checkpointing(model))
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
            raise InputError(f"train.best_metric '{cfg.train.best_metric}' not among {sorted(row)}")
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
            # The optimizer state (Adam: two moments per weight) would triple best.pth; inference reads weights.
            if improved:
                best_ckpt = {k: v for k, v in ckpt.items() if k not in RESUME_ONLY}
                save_checkpoint(best_ckpt, run / "best.pth")
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
    """``--fold``: one fold of the fold file, or ``all`` = every fold the pipeline trains."""
    pipeline = load_pipeline(cfg.pipeline)
    available = sorted(load_folds(paths.folds_csv(cfg), pipeline.id_col)["fold"].unique().tolist())
    if fold == "all":
        return pipeline.train_folds(cfg, available) if pipeline.train_folds else available
    if not fold.isdigit() or int(fold) not in available:
        raise InputError(f"--fold must be 'all' or one of {available}, got {fold!r}")
    return [int(fold)]


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument(
        "--fold", default="all", help="fold number or 'all' (default: every fold in sequence)"
    )
    args = parser.parse_args(argv)
    with cli.running():
        cfg = cli.load(args)
        check_components(cfg)  # before any run folder exists
        if not paths.folds_csv(cfg).is_file():
            raise InputError(
                f"{paths.folds_csv(cfg)} not found; run "
                f"python -m utils.fold_split --CFG {args.CFG} first"
            )
        folds = folds_to_run(cfg, args.fold)
        info, device = distributed.setup(resolve_device(cfg.device))
        try:
            invocation = experiments.Invocation.of(args)
            results = {k: run_fold(cfg, k, invocation, device, info) for k in folds}
            distributed.barrier(
                info
            )  # rank 0 has written the last checkpoint when torchrun returns
        finally:
            distributed.teardown(info)
    log.info(
        "best %s per fold: %s", cfg.train.best_metric, {k: round(v, 5) for k, v in results.items()}
    )


if __name__ == "__main__":
    main()
