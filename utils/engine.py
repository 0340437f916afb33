"""Device, mixed precision, data loaders and batched prediction shared by train.py and inference.py."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from utils.config import progress_off
from utils.datasets import StageDataset
from utils.seed import loader_generator, worker_init_fn

# One OpenCV thread per process, set when the training / inference machinery is imported, before
# any dataset calls cv2: a forked DataLoader worker deadlocks once the parent has started
# OpenCV's thread pool, and loader workers parallelise anyway.
cv2.setNumThreads(1)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(cfg, device: torch.device):
    """bf16 autocast on CPU and on bf16-capable GPUs, fp16 on older GPUs; off when ``train.amp`` is false."""
    if not cfg["train"]["amp"]:
        return nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def needs_scaler(cfg, device: torch.device) -> bool:
    """fp16 (not bf16) needs loss scaling."""
    return (
        bool(cfg["train"]["amp"]) and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    )


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Move the tensors of a batch; other fields (case ids, paths) pass through unchanged.

    4-D image tensors go channels_last when asked (5-D sequences are reshaped in the model).
    """
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.ndim == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (the length of its first field)."""
    return len(next(iter(batch.values())))


def make_loader(
    cfg,
    ds: StageDataset,
    train: bool,
    epoch: int = 0,
    sampler: Sampler | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """Shuffled (train) or ordered loader; the order depends only on ``seed + epoch``.

    ``sampler`` (e.g. a DistributedSampler) replaces the shuffling; it is told the epoch.
    ``batch_size`` (a DDP process's share) replaces the config's; whether the last partial
    training batch is dropped still follows the config's (global) ``train.batch_size``.
    """
    ds.set_epoch(epoch)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    bs = cfg["train"]["batch_size"] if train else cfg["infer"]["batch_size"]
    return DataLoader(
        ds,
        batch_size=batch_size or bs,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(ds) > bs,
        num_workers=cfg["num_workers"],
        generator=loader_generator(cfg["seed"] + epoch),
        worker_init_fn=worker_init_fn,
        pin_memory=torch.cuda.is_available(),
    )


def prepare_model(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if cfg["train"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model


def enable_grad_checkpointing(model: torch.nn.Module) -> int:
    """Turn on gradient checkpointing in every timm model inside ``model``; returns how many.

    timm models offer it as ``set_grad_checkpointing``: their blocks' activations are recomputed
    in the backward pass instead of kept, so a training step needs far less memory and computes
    the same gradients (torch's checkpoint replays the random state of dropout and drop-path).
    """
    owners = [m for m in model.modules() if callable(getattr(m, "set_grad_checkpointing", None))]
    for module in owners:
        module.set_grad_checkpointing(True)
    return len(owners)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _numpy(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.float().cpu().numpy() for k, v in out.items()}


@torch.inference_mode()
def stream_predictions(
    cfg, models: Sequence[torch.nn.Module], loader: Iterable, device, desc: str = "predict"
) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Yield ``(batch, outputs)`` per batch, the outputs (float32) averaged over ``models``.

    Nothing is accumulated, so predictions of any size (full-resolution masks) can be written
    batch by batch; the batch keeps its non-tensor fields (case ids) to say what was predicted.
    """
    for m in models:
        m.eval()
    for batch in tqdm(loader, desc=desc, leave=False, disable=progress_off(cfg)):
        batch = to_device(batch, device, cfg["train"]["channels_last"])
        outs = []
        for m in models:
            with autocast(cfg, device):
                outs.append(_numpy(m(batch)))
        yield batch, outs[0] if len(outs) == 1 else mean_outputs(outs)


@torch.inference_mode()
def predict(
    cfg, model, loader, device, loss_fn=None, desc: str = "predict", quiet: bool = False
) -> tuple[dict[str, np.ndarray], float]:
    """Concatenated float32 outputs of one model over ``loader`` (+ the mean loss with ``loss_fn``).

    For validation sets, which fit in memory; large predictions go through ``stream_predictions``.
    ``quiet`` hides the progress bar (DDP ranks other than 0).
    """
    model.eval()
    outs: dict[str, list[np.ndarray]] = {}
    total, n = 0.0, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=quiet or progress_off(cfg)):
        batch = to_device(batch, device, cfg["train"]["channels_last"])
        with autocast(cfg, device):
            out = model(batch)
        if loss_fn is not None:
            size = batch_size_of(batch)
            total += loss_fn(out, batch).item() * size
            n += size
        for key, value in _numpy(out).items():
            outs.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in outs.items()}, (total / n if n else float("nan"))


def mean_outputs(outputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Average the outputs of several models (fold ensemble) key by key."""
    return {k: np.mean([o[k] for o in outputs], axis=0) for k in outputs[0]}


def build_optimizer(cfg, model: torch.nn.Module, steps_per_epoch: int):
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
