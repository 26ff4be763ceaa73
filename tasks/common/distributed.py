"""This process's place among the processes of one stage run (``torchrun`` sets RANK, LOCAL_RANK and
WORLD_SIZE; a plain run is rank 0 of 1)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, total: int) -> list[int]:
        """The indices of ``range(total)`` that this process handles: rank r of W takes r, r + W, r + 2W, ..."""
        return list(range(self.rank, total, self.world_size))

    def start(self, device: torch.device) -> None:
        """Join the process group (nccl on CUDA, gloo elsewhere) when there is more than one process."""
        if self.distributed and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def finish(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        """Where collectives need their tensors: the GPU for nccl, the CPU for gloo."""
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others wait for rank 0 to get there)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: int) -> int:
        """``value`` summed over the ranks (a barrier too)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.long, device=self._device())
        dist.all_reduce(total)
        return int(total.item())
