"""Distributed setup under ``torchrun`` for training (torch.distributed DDP: NCCL on CUDA, gloo on CPU) and
for sample sets (:mod:`vqdiffusion.eval.sample_set`).

The recipe is DiT's: every process reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set by ``torchrun``, joins
the process group, seeds its initialisation identically, and only global rank 0 writes; all ranks meet at
a barrier after each save.  A sample set splits its images over the ranks, each writing its own files.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..devices import resolve_device

__all__ = ["DistributedContext", "all_gather_rows", "setup_distributed", "wrap_ddp"]


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run: ``rank`` of ``world_size`` (1 without torchrun), ``local_rank`` on its
    node, and whether this process created the process group (and so destroys it, :meth:`close`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Global rank 0: the process that logs, samples and saves."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank; the other ranks' ``obj`` is ignored."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Read torchrun's environment and join (or reuse) the process group; returns the context and this
    process's device (``cuda:LOCAL_RANK`` on CUDA unless an index is given)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group ({dist.get_rank()}/{dist.get_world_size()}) disagrees with RANK/WORLD_SIZE")
    return DistributedContext(rank, world, local_rank, owns), device


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (one device per process on CUDA; buffers are constants, so they
    are not broadcast on every forward)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    keyword = "forward_sync_buffers"  # torch >= 2.13; earlier versions call it broadcast_buffers
    if keyword not in inspect.signature(DistributedDataParallel.__init__).parameters:
        keyword = "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=device_ids, **{keyword: False})


def all_gather_rows(local: torch.Tensor, world_size: int, accum: int, micro_batch: int) -> torch.Tensor:
    """Per-rank ``local`` [C, accum * B] -> [C, G] in global row order, where micro-step m of rank r holds
    global rows ``(m * world_size + r) * B ...`` (identity for one process)."""
    if world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous())
    c = local.shape[0]
    stacked = torch.stack([p.view(c, accum, micro_batch) for p in parts], dim=2)  # [C, accum, world, B]
    return stacked.reshape(c, -1)
