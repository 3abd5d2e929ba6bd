"""One process or many: rank, world and device of a training process, from torchrun's environment.

`torchrun --nproc_per_node=N -m training train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run
is a single process. Each process takes the GPU of its local rank (`--device auto`: when the machine has a
GPU for every process, else the CPU). The backend is NCCL when the processes have GPUs and gloo on CPUs,
unless told otherwise.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["Backend", "Context", "distributed", "launched_rank"]

Backend = Literal["auto", "nccl", "gloo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run."""

    rank: int  # 0 .. world_size - 1
    world_size: int  # processes in the run
    device: torch.device  # where this process computes

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and shows progress."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (the values themselves in a single process)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.tolist()]

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` averaged over all ranks (itself in a single process); every rank must call it."""
        if self.world_size == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on each), in rank order."""
        if self.world_size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.to(self.device))
        return [part.cpu() for part in parts]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _device(local_rank: int, local_world_size: int, device: str) -> torch.device:
    """The device of the process of `local_rank` among `local_world_size` on this machine."""
    # A launcher that sets LOCAL_RANK but not LOCAL_WORLD_SIZE runs at least local_rank + 1 processes here.
    processes = max(local_world_size, local_rank + 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        # CUDA when every process on this machine can have a GPU of its own: the same answer on every rank.
        device = "cuda" if processes <= gpus else "cpu"
        if device == "cpu" and gpus and local_rank == 0:
            log.warning(
                "this machine has %d GPU(s) for %d processes: training on the CPU "
                "(--nproc_per_node=%d puts one on each GPU)",
                gpus,
                processes,
                gpus,
            )
    if device == "cuda":
        if not gpus:
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        if processes > gpus:
            raise ValueError(
                f"--device cuda: this machine has {gpus} GPU(s) for {processes} processes; each process "
                f"needs one of its own (torchrun --nproc_per_node={gpus})"
            )
        # Each process takes the GPU of its local rank.
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def launched_rank() -> int:
    """This process's rank as torchrun set it (RANK); 0 for a single process."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def distributed(backend: Backend = "auto", device: str = "auto") -> Iterator[Context]:
    """The process group for the run's duration (none for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = _device(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device)
    if world_size == 1:
        yield Context(rank=0, world_size=1, device=where)
        return
    chosen = backend if backend != "auto" else ("nccl" if where.type == "cuda" else "gloo")
    dist.init_process_group(backend=chosen, device_id=where if where.type == "cuda" else None)
    try:
        yield Context(rank=rank, world_size=world_size, device=where)
    finally:
        # DistributedDataParallel sits in reference cycles: left to the collector, its reducer (and the
        # gloo work it holds) was torn down at interpreter exit, after the group, and could abort the
        # process (SIGABRT, "terminate called without an active exception"). Collected here, it goes
        # while the group is alive.
        gc.collect()
        dist.destroy_process_group()
