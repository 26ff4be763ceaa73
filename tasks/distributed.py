"""This process's place among the processes of one stage run (``torchrun`` sets RANK, LOCAL_RANK and
WORLD_SIZE; a plain run is rank 0 of 1)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tasks.config import Params, load_params
from tasks.errors import UserError, out_of_memory


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


def rank_main(
    stage: str,
    run: Callable[[Params, argparse.Namespace], dict[str, Any]],
    argv: list[str] | None,
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> int:
    """The entry point of one process of ``stage`` under torchrun (``python -m tasks.<stage> --params FILE
    --set key=value ...``): rank 0 prints the result as one JSON line; an error is one ``ddim <stage>: error:``
    line and exit status 1."""
    parser = argparse.ArgumentParser(description=f"one process (or rank) of ddim {stage}")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = run(load_params(args.params, args.overrides), args)
    except Exception as e:
        error = e if isinstance(e, UserError) else out_of_memory(stage, e)
        if error is None:
            raise
        print(f"ddim {stage}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    if Ranks.from_env().is_main:
        print(json.dumps(result))
    return 0
