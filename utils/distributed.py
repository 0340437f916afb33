"""Multi-process (DDP) training under ``torchrun``: process group, samplers, gathering validation.

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``;
:func:`setup` joins the process group (NCCL on CUDA, gloo on CPU). Run alone (no ``WORLD_SIZE``
or ``WORLD_SIZE=1``) every helper here is a no-op and nothing of ``torch.distributed`` is used.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from utils.errors import InputError
from utils.seed import loader_generator


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes logs, checkpoints, metrics and curves."""
        return self.rank == 0


SINGLE = DistInfo()


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; returns (info, this rank's device).

    On CUDA each process takes the GPU ``cuda:LOCAL_RANK`` and talks NCCL; on CPU gloo.
    Multi-node jobs need nothing more here: torchrun's rendezvous flags set the same variables.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank), device


def teardown(info: DistInfo) -> None:
    """Leave the process group once every rank is done (call on success and on error)."""
    if info.enabled and dist.is_initialized():
        # Free the last DDP wrapper (its reducer holds the group; DDP keeps reference cycles)
        # before the group goes, not during interpreter shutdown.
        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (rank 0's weights and buffers are broadcast).

    ``static_graph``: parameters that never reach the loss (e.g. the deep-supervision heads of
    nnU-Net's PlainConvUNet when deep supervision is off) are found in the first step instead
    of failing the second; the set of used parameters must not change from step to step (a loss
    keeps every head in the graph even when a batch has no target for one of them).
    """
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each training forward, so after the last step each rank
    holds its own last update; validation must use the statistics rank 0 saves.
    """
    if info.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """The per-process share of the global ``train.batch_size`` (which must divide evenly)."""
    if batch_size % info.world:
        raise InputError(
            f"train.batch_size={batch_size} (the global batch) is not divisible by "
            f"the {info.world} processes"
        )
    return batch_size // info.world


class ShuffleShardSampler(DistributedSampler):
    """Rank r's share of the permutation that a single process's shuffling loader draws.

    ``make_loader`` alone shuffles with ``loader_generator(seed + epoch)``; this sampler replays
    that permutation and gives rank r every ``world``-th index from r on. With a per-rank batch of
    ``B / world``, the ranks' k-th batches together are exactly the single process's k-th batch
    of ``B``. ``drop_last`` cuts the tail that the single process's last (dropped) partial batch
    holds anyway. ``set_epoch`` (called by ``make_loader``) selects the epoch's permutation.
    """

    def __iter__(self) -> Iterator[int]:
        g = loader_generator(self.seed + self.epoch)
        # A DataLoader iterator first draws its workers' base seed from its generator, then its
        # RandomSampler permutes with it (torch.utils.data): replay both.
        torch.empty((), dtype=torch.int64).random_(generator=g)
        indices = torch.randperm(len(self.dataset), generator=g).tolist()[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


def train_sampler(n: int, seed: int, info: DistInfo) -> ShuffleShardSampler | None:
    """The training sampler of this rank; None when run alone (the loader shuffles itself)."""
    if not info.enabled:
        return None
    return ShuffleShardSampler(
        range(n), num_replicas=info.world, rank=info.rank, seed=seed, drop_last=True
    )


class ShardSampler(Sampler[int]):
    """Rank r's contiguous block of ``range(n)`` (no padding, blocks may differ by one batch).

    Concatenating the ranks' outputs in rank order gives the dataset order back, every row once
    (a ``DistributedSampler`` would interleave and pad with duplicates).
    """

    def __init__(self, n: int, info: DistInfo):
        size = -(-n // info.world)
        self.start, self.stop = min(n, info.rank * size), min(n, (info.rank + 1) * size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def val_sampler(n: int, info: DistInfo) -> ShardSampler | None:
    return ShardSampler(n, info) if info.enabled else None


def mean_over_ranks(value: float, info: DistInfo) -> float:
    """The mean of a per-rank scalar (e.g. the epoch's training loss) over the processes."""
    if not info.enabled:
        return value
    values: list[Any] = [None] * info.world
    dist.all_gather_object(values, value)  # objects: no device tensor needed (gloo and NCCL)
    return sum(values) / info.world


def gather_predictions(
    outs: dict[str, np.ndarray], loss: float, n: int, info: DistInfo
) -> tuple[dict[str, np.ndarray], float] | None:
    """Rank 0: every rank's ``(outputs, mean loss over n samples)`` joined in dataset order.

    Ranks hold the contiguous blocks of :class:`ShardSampler`, so the concatenation in rank order
    is the validation table's order. The loss is the sample-weighted mean over all ranks. Other
    ranks get None. Alone: the arguments unchanged.
    """
    if not info.enabled:
        return outs, loss
    parts: list[Any] = [None] * info.world if info.main else None
    dist.gather_object((outs, loss, n), parts, dst=0)
    if not info.main:
        return None
    parts = [p for p in parts if p[2] > 0]
    joined = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    total = sum(p[1] * p[2] for p in parts)
    return joined, total / sum(p[2] for p in parts)


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the epoch's metrics row)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
