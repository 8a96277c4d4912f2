"""Where a run executes: rank and device from ``torchrun``, and what the ranks agree on.

Without ``torchrun`` (no ``WORLD_SIZE``) a run is one process and the collectives here are
identities or no-ops. Under ``torchrun`` the process group is NCCL on GPUs and gloo on CPUs;
every rank calls the same functions in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Runtime:
    """This process's place in the run: its rank, its device, and whether it runs under DDP."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str) -> Runtime:
    """Rank and device from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    import torch
    import torch.distributed as dist

    from wit_pipeline import models

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = models.resolve_device(device)
    if world_size > 1:
        if device == "cuda":
            device = f"cuda:{local_rank}"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Runtime(rank, local_rank, world_size, device, world_size > 1)


def sync_step(
    exhausted: bool, sizes: Sequence[int], skipped: int, rt: Runtime
) -> tuple[bool, list[int], int, int]:
    """What every rank must agree on before a step (one tiny all_gather under DDP).

    Returns whether any rank ran out of batches; the smallest size of each micro-batch over the
    ranks (a rank's batch is short when images in it failed to decode); the samples skipped on
    all ranks together; and how many samples all ranks together drop by trimming their
    micro-batches to those sizes. Every rank trims: the features gathered for the contrastive
    loss must have the same shape on every rank.
    """
    if not rt.distributed:
        return exhausted, list(sizes), skipped, 0
    import torch
    import torch.distributed as dist

    device = rt.device if rt.device.startswith("cuda") else "cpu"
    mine = torch.tensor([int(exhausted), skipped, *sizes], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    table = torch.stack(every).cpu()
    smallest = table[:, 2:].min(dim=0).values
    return (
        bool(table[:, 0].max()),
        [int(x) for x in smallest],
        int(table[:, 1].sum()),
        int((table[:, 2:] - smallest).sum()),
    )


def gather_positions(consumed: list[int], rt: Runtime) -> list[list[int]]:
    """Every rank's data position (batches each of its workers delivered), in rank order."""
    if not rt.distributed:
        return [list(consumed)]
    import torch.distributed as dist

    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, list(consumed))
    return [list(x) for x in out]


def broadcast(obj: Any, rt: Runtime) -> Any:
    """The main rank's ``obj`` on every rank (a decision only the main rank can make)."""
    if not rt.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: Any) -> Any:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return getattr(model, "module", model)


def wrap(model: Any, rt: Runtime) -> Any:
    """``model`` under ``DistributedDataParallel`` when the run is distributed."""
    if not rt.distributed:
        return model
    import torch

    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.local_rank] if rt.device.startswith("cuda") else None
    )


def barrier(rt: Runtime) -> None:
    """Wait for every rank (the others wait while the main rank evaluates)."""
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(rt: Runtime) -> None:
    """Wait for every rank, then leave the process group."""
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
