"""Work replayed as a CUDA graph: captured once, then launched as one unit per call.

An eager training step of a 32 px U-Net is bound by the host launching ~2,000 small kernels, not by the GPU
(docs/results.md, "On a GPU"). A captured graph replays all of them in one launch. What is captured must be
*static*: its inputs are tensors filled in place (``copy_``/``fill_``) before each replay, its outputs are the
same tensors every time, nothing inside reads a value back to the host, and the random numbers come from the
generator's graph-safe state (a replay draws from the generator's seed and offset at the time of the replay,
so ``torch.manual_seed(s)`` before a replay gives the draws of seed ``s``, as it does for eager work).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from tasks.common.errors import first_line

Out = TypeVar("Out")


class Graphed(Generic[Out]):
    """``fn()`` eagerly for its first ``warmup`` calls (on a side stream, as capture asks), then captured as a
    CUDA graph and replayed at every call after; each call does ``fn``'s work exactly once and returns its
    output (once captured, the same static tensors every time). Where the capture fails, it says why once and
    runs ``fn()`` eagerly from then on. Off CUDA the work is not captured: ``fn()`` runs at every call, the same
    work the graph would replay (what the CPU tests check)."""

    def __init__(self, fn: Callable[[], Out], device: torch.device, warmup: float = 3) -> None:
        self.fn, self.device, self.warmup = fn, device, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Out | None = None

    @property
    def captures(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self) -> Out:
        if self.graph is not None:
            self.graph.replay()
            return self.out  # type: ignore[return-value]
        if not self.captures:
            return self.fn()
        self.calls += 1
        if self.calls <= self.warmup:
            return on_side_stream(self.fn)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph):
                self.out = self.fn()  # recorded, not run
        except RuntimeError as e:  # something in fn cannot be captured: say so once, and stay eager
            print(f"CUDA graph capture failed ({first_line(e)}): the work runs eagerly", file=sys.stderr)
            self.warmup = float("inf")
            return on_side_stream(self.fn)
        self.graph = graph
        graph.replay()
        return self.out


def on_side_stream(fn: Callable[[], Out]) -> Out:
    """``fn()`` on a fresh CUDA stream, ordered after and before the current one: the warm-up that capture
    needs (lazy initialisation, cuDNN's algorithm search and the allocator's first blocks happen here)."""
    side, current = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    return out
