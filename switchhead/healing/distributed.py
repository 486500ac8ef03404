"""torch.distributed for healing: start from torchrun's environment, wrap, reduce.

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in the environment) heal() starts the process
group itself (gloo on CPU, NCCL on CUDA) unless the caller already did, and ends it when it
started it. A single process needs no process group at all.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str | None, student: torch.nn.Module, local_rank: int, distributed: bool) -> torch.device:
    """The device of this process: the request (a bare "cuda" under torchrun means this local
    rank's GPU), else the student's."""
    if requested is None:
        first = next(iter(student.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    else:
        device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    return device


def setup(requested_device: str | None, student: torch.nn.Module) -> tuple[DistInfo, torch.device]:
    """Join (or start, from torchrun's environment) the process group; pick this process's device."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = dist.is_available() and (dist.is_initialized() or world_env > 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, student, local_rank, distributed)
    if not distributed:
        return DistInfo(), device
    started = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, started), device


def teardown(info: DistInfo) -> None:
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `tensor` over all processes (the tensor itself in one process)."""
    if info.world > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """`value` of every rank, in rank order."""
    if info.world == 1:
        return [value]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, strategy: str, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """The module that training calls: DDP or FSDP2 (`fully_shard`, in place) across processes,
    the model itself in one process."""
    if info.world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)
