"""Splitting a stage across processes launched by torchrun (one per GPU, on one or many nodes).

Every rank loads the model on its own device and works on its share of the questions, writing
its part files into the stage's part directory (a shared filesystem across nodes); rank 0 then
merges the parts into the same files a single-process run writes. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's place among the workers: rank, world size, local rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's share: every world_size-th item (strided, so lengths stay balanced)."""
        return items[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), in rank order, on every rank; a barrier too."""
        if self.world_size == 1:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def device(self, requested: str) -> str:
        """The device this rank runs on: its own GPU under torchrun unless --device cpu."""
        if self.world_size == 1 or requested == "cpu":
            return requested
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested


def launched_workers() -> Workers:
    """The ranks torchrun set in the environment (a single process otherwise)."""
    return Workers(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init_workers(device: str = "auto") -> Workers:
    """Join the process group torchrun prepared (once per process) and return this rank."""
    workers = launched_workers()
    if workers.world_size > 1 and not dist.is_initialized():
        use_nccl = device != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(workers.local_rank)
        dist.init_process_group("nccl" if use_nccl else "gloo")
        atexit.register(_leave_group)
    return workers


def _leave_group() -> None:
    """Leave the process group at exit, as NCCL asks (it warns of leaked resources otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()
