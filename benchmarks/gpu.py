"""Speed on whatever device this finds: training, sampling and FID features, ours beside diffusers. A table, the
issue's targets read off it, and JSON.

    python benchmarks/gpu.py                          # a CUDA GPU: the gpu size, every section; else the cpu size
    python benchmarks/gpu.py --size cpu --only full --json out.json
    python benchmarks/gpu.py --only bare-compiled full-compiled --batches 16 128
    python benchmarks/gpu.py --size tiny              # seconds: what the test suite runs
    python benchmarks/gpu.py --report a.json b.json   # measures nothing: the table and targets of saved reports

Each figure is the median of ``blocks`` timed blocks of ``iters`` calls after warm-up, the GPU synchronised
around each block. Training is measured at every per-GPU batch of the size (16, 32, 64, 128 and 256 on the GPU;
``--batches`` picks others). Sections (``--only``, in the order given):

- ``bare``: forward + MSE + backward of the U-Net alone on a random batch already on the device, ours and
  diffusers' ``UNet2DModel`` at the same config (``models.weights.diffusers_config``) and precision. Both memory
  formats are measured at the largest batch, where the convolutions decide (smaller steps are bound by the host
  launching kernels), and the faster of the two is used at the other batches.
- ``bare-compiled``: the same, ``torch.compile(..., dynamic=False)`` in that faster format (read from this
  process's ``bare`` rows, or measured first when there are none): one compile per network and batch.
- ``full``: the real step as ``ddim train`` takes it (``build_trainer``, ``make_step``, ``batches``) on a
  ``shapes`` dataset: ``eager`` (train.compile and train.cuda_graphs false) and ``graphed`` (train.cuda_graphs
  true: ``GraphedStep``, one CUDA graph per step; on the CPU the same work, uncaptured), each with DataLoader
  batches (train.data_on_device false, the size's workers) and with batches gathered from the dataset held in
  device memory (data_on_device true). 8 warm-up steps: the graph is captured at the 5th call.
- ``full-compiled``: the ``compiled`` step (train.compile true; cuda_graphs auto, which ``graph_plan`` turns into
  the compiled eager step), both data paths; one compile per batch (the second data path hits the caches).
- ``sample``: DDIM-10 and DDIM-100 (eta 0, quad spacing, batch 1,000 on the GPU) through
  ``models.diffusion.ddim_sample``, the network ``eager`` and ``graphed`` (its call captured once as a CUDA graph,
  :class:`GraphedEps`); beside 100 bare network calls. ``max_abs_diff``: against the eager network's images from
  the same x_T; a graphed row also says whether they agree to float tolerance.
- ``sample-compiled``: the same with the network compiled (``torch.compile``, as ``sample.compile`` does): one
  compile; the eager images it is compared with are made first, untimed.
- ``inception``: FID feature images/s (``tasks.common.fid.batch_features``, 32 px images resized to 299); random
  weights (said so) where pytorch-fid's are not installed: speed does not depend on them.
- ``fid``: the Frechet distance of two 2048-d Gaussians, scipy's ``sqrtm`` beside a float64 eigenvalue form on
  the device, and their difference.

Train rows carry images/s, steps/s, the peak GPU memory and the fraction of the bf16 (or fp32) matmul rate
measured at the start of the run that the counted forward + backward FLOPs of the U-Net reach (counted per
batch on the meta device). A measurement that raises (a capture, a compile) leaves an ``error`` row, its
traceback on stderr, and the run goes on. Since the last H100 run (docs/results.md) these are no longer
measured: the whole step with fused Adam (slower there, 12.89 vs 13.56 steps/s) or channels-first (the bare
rows compare the formats), DDIM with eta 1 (2% slower than eta 0), and ``sample_images`` (the stage's call ran
at the bare calls' speed). Without diffusers installed its rows are left out (and the 1.3x target unread).

Wall time at the gpu size on one H100 (estimates from the last run's rates; a compile of this 35.7M U-Net is
taken as 30-60 s, a retrace that hits the compile caches as 10-20 s):

| section | measurements | compiles | minutes |
|---|---|---|---|
| start-up (imports, matmul rate) | | | 0.3 |
| bare | 2 networks x (2 formats at 256 + 4 batches) = 12 | 0 | 1-1.5 |
| full | 2 steps x 2 data x 5 batches = 20 (+ a 10,000-image dataset, 6 s) | 0 | 2-3 |
| sample | DDIM-10, DDIM-100 x (eager, graphed), 100 bare calls | 0 | 0.7-1 |
| inception + fid | | 0 | 0.3 |
| bare-compiled | 2 networks x batches (+ 4 eager format rows when run alone) | 2 per batch | 1-2 per batch |
| full-compiled | 2 data x batches | 1 per batch (+ 1 retrace) | 0.8-1.5 per batch |
| sample-compiled | 2 + 2 untimed eager | 1 | 1 |

The compiled sections at all 5 batches are 16 compiles, 9-17 minutes: more than one 10-minute call. The default
run (everything) fits where time is plenty; for about 15 minutes of device time, two calls back to back on the
same machine (the JSON is rewritten after every row, so a call stopped by its limit keeps what it measured):

    1. --only bare full sample inception fid --json $OUT/eager.json                                  (4-6 min)
    2. --only bare-compiled full-compiled sample-compiled --batches 16 128 --json $OUT/compiled.json  (5-9 min;
       --batches 128: 3.5-5 min)

then, here, ``--report eager.json compiled.json`` prints the table and the targets of both. Progress goes to
stderr, one line per measurement with the seconds since the start and the warm-up's (compile, capture) seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.unet import UNet, UNetConfig
from models.weights import diffusers_config


@dataclasses.dataclass(frozen=True)
class Size:
    model: UNetConfig
    train_batches: tuple[int, ...]  # per-GPU batch sizes of every train row
    target_batches: tuple[int, int]  # (small, large): where the targets are read (the 16 and 128)
    sample_batch: int
    sample_steps: tuple[int, int]
    inception_batch: int
    fid_dims: int
    blocks: int  # timed blocks per measurement (the median is reported)
    iters: int  # iterations per block
    compile: bool  # whether the compiled sections are in the default run
    matmul_n: int
    dataset_count: int
    num_workers: int


SIZES = {
    "gpu": Size(
        model=UNetConfig.ddpm_cifar10(),
        train_batches=(16, 32, 64, 128, 256),
        target_batches=(16, 128),
        sample_batch=1000,
        sample_steps=(10, 100),
        inception_batch=500,
        fid_dims=2048,
        blocks=5,
        iters=10,
        compile=True,
        matmul_n=8192,
        dataset_count=10_000,  # 39 steps per epoch at 256: at most one epoch start (new workers) in a row's 58
        num_workers=4,
    ),
    "cpu": Size(
        model=UNetConfig(ch=32, attn_resolutions=(16,)),
        train_batches=(4, 8),
        target_batches=(4, 8),
        sample_batch=8,
        sample_steps=(10, 100),
        inception_batch=16,
        fid_dims=2048,
        blocks=3,
        iters=2,
        compile=False,
        matmul_n=1024,
        dataset_count=64,
        num_workers=0,
    ),
    "tiny": Size(
        model=UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)),
        train_batches=(2, 4),
        target_batches=(2, 4),
        sample_batch=2,
        sample_steps=(2, 3),
        inception_batch=2,
        fid_dims=64,
        blocks=2,
        iters=1,
        compile=False,
        matmul_n=128,
        dataset_count=8,
        num_workers=0,
    ),
}

# The whole step's untimed calls: GraphedStep runs step 0 eagerly, then Graphed's 3 warm-up calls, and captures
# at the 5th call; a compiled step compiles at its first. Neither is timed.
WHOLE_STEP_WARMUP = 8
# Graphed and eager DDIM replay the same kernels on the same inputs: they agree to rounding or there is a bug.
GRAPH_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_iter(
    fn: Callable[[], Any],
    device: torch.device,
    blocks: int,
    iters: int,
    warmup: int = 2,
    record: dict[str, Any] | None = None,
) -> float:
    """Median over ``blocks`` of (block time / ``iters``), after ``warmup`` untimed calls (their seconds, which
    hold any compile or capture, go to ``record["warmup_s"]`` when a dict is given)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    if record is not None:
        record["warmup_s"] = round(time.perf_counter() - start, 2)
    times = []
    for _ in range(blocks):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, Any]):
    """Records the peak allocated GPU memory (GiB) of the block in ``out["peak_gib"]`` (None on the CPU), after
    freeing what earlier measurements left (their graphs and trainers hold reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """The measured rate of one n x n x n matrix product (random operands), TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds_per_iter(lambda: a @ b, device, 5, 5) / 1e12


def autocast(device: torch.device, amp: torch.dtype | None, cache: bool = True):
    """Autocast to ``amp`` on ``device``; nothing when ``amp`` is None (fp32, or the meta device)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp, cache_enabled=cache)


# ---------------------------------------------------------------------------------------------------------
# What every section reads
# ---------------------------------------------------------------------------------------------------------


def networks(config: UNetConfig) -> dict[str, Callable[[], torch.nn.Module]]:
    """Constructors of the compared networks (diffusers only where it is installed)."""
    out: dict[str, Callable[[], torch.nn.Module]] = {"ours": lambda: UNet(config)}
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return out
    out["diffusers"] = lambda: UNet2DModel(**diffusers_config(config))
    return out


@dataclasses.dataclass
class Bench:
    """One run's setting: the size, the train batches, the device and autocast dtype, the matmul rate measured
    at the start (TFLOP/s), a work folder, and the rows measured so far in this process."""

    size: Size
    batches: tuple[int, ...]
    device: torch.device
    amp: torch.dtype | None
    peak_tflops: float
    work: Path
    rows: list[dict]
    counted: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)

    def flops(self, network: str, batch: int) -> float:
        """:func:`train_flops` of ``network`` at ``batch``, counted once."""
        if (network, batch) not in self.counted:
            self.counted[network, batch] = train_flops(networks(self.size.model)[network], batch)
        return self.counted[network, batch]

    def measure(self, row: dict, fn: Callable[[], Any], batch: int, warmup: int, network: str = "ours") -> dict:
        """``row`` with the images/s, steps/s, peak memory and matmul fraction of the train step ``fn``."""
        with peak_memory(self.device, row):
            sec = seconds_per_iter(fn, self.device, self.size.blocks, self.size.iters, warmup, row)
        row.update(batch=batch, images_per_s=batch / sec, steps_per_s=1 / sec)
        row["matmul_fraction"] = self.flops(network, batch) / sec / 1e12 / self.peak_tflops
        return row


def attempt(measure: Callable[[], dict], **about: Any) -> dict:
    """``measure()``'s row; where it raises, an error row of ``about`` and the error (its traceback on stderr), so
    that one failed measurement (a capture, a compile) does not cost a device call its other measurements."""
    try:
        return measure()
    except Exception as e:  # reported in the row and on stderr
        traceback.print_exc()
        return {"what": "error", **about, "error": f"{type(e).__name__}: {e}"[:500]}


# ---------------------------------------------------------------------------------------------------------
# Training: the bare network, ours and diffusers'
# ---------------------------------------------------------------------------------------------------------


def eps_of(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out if isinstance(out, torch.Tensor) else out.sample  # diffusers returns a UNet2DOutput


def model_size(model: torch.nn.Module) -> int:
    config = model.config
    return config.image_size if isinstance(config, UNetConfig) else config["sample_size"]


def bare_step_fn(model: torch.nn.Module, batch: int, device: torch.device, amp: torch.dtype | None, cl: bool):
    """forward + MSE + backward on a fixed random batch (gradients dropped each time, as zero_grad does)."""
    size, fmt = model_size(model), torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    t, noise = torch.randint(0, 1000, (batch,), device=device), torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        with autocast(device, amp):
            loss = F.mse_loss(eps_of(model, x, t).float(), noise)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def train_flops(build: Callable[[], torch.nn.Module], batch: int) -> float:
    """FLOPs of one forward + backward at ``batch`` (matrix products, convolutions and attention, as PyTorch
    counts them), on the meta device: no memory or time, and the same count whichever kernels a device would
    pick (PyTorch counts no FLOPs for the CPU's attention kernel, so counted there diffusers' would lack them)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        model = build()
    counter = FlopCounterMode(display=False)
    with counter:
        bare_step_fn(model, batch, meta, None, False)()
    return float(counter.get_total_flops())


def time_bare(b: Bench, model: torch.nn.Module, name: str, batch: int, cl: bool, compiled: bool) -> dict:
    """One train/bare row: ``model`` (``name``) at ``batch`` in one memory format, eager or compiled (a fresh,
    static-shape compile: what a run at this one batch gets)."""
    net = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    if compiled:
        torch._dynamo.reset()
        net = torch.compile(net, dynamic=False)
    row: dict[str, Any] = {"what": "train/bare", "model": name, "channels_last": cl, "compile": compiled}
    return b.measure(row, bare_step_fn(net, batch, b.device, b.amp, cl), batch, warmup=3, network=name)


def format_rows(b: Bench, model: torch.nn.Module, name: str) -> tuple[list[dict], bool]:
    """Eager rows of ``name`` in both memory formats at the largest batch (this process's, or measured now), the
    new ones among them, and whether channels_last was the faster."""
    largest = max(b.batches)
    known = [
        r
        for r in b.rows
        if r["what"] == "train/bare" and r["model"] == name and not r["compile"] and r["batch"] == largest
    ]
    new = []
    if {r["channels_last"] for r in known} != {False, True}:
        known = new = [time_bare(b, model, name, largest, cl, compiled=False) for cl in (False, True)]
    return new, max(known, key=lambda r: r["steps_per_s"])["channels_last"]


def bench_bare(b: Bench, compiled: bool) -> Iterator[dict]:
    """Each network's bare step at every batch: eager (both formats at the largest batch, the faster format at
    the others), or compiled in the faster format."""
    for name, build in networks(b.size.model).items():
        torch.manual_seed(0)
        model = build().to(b.device).train()
        new, cl = format_rows(b, model, name)
        yield from new
        for batch in b.batches:
            if compiled or batch != max(b.batches):
                measure = functools.partial(time_bare, b, model, name, batch, cl, compiled)
                yield attempt(measure, section="train/bare", model=name, compile=compiled, batch=batch)


# ---------------------------------------------------------------------------------------------------------
# Training: our whole step
# ---------------------------------------------------------------------------------------------------------

# The step's variants, as train params (the names are the rows' ``step`` and ``data``).
STEP_VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"compile": False, "cuda_graphs": False},
    "compiled": {"compile": True},  # cuda_graphs auto: graph_plan runs the compiled eager step
    "graphed": {"compile": False, "cuda_graphs": True},
}
DATA_VARIANTS: dict[str, dict[str, Any]] = {"DataLoader": {"data_on_device": False}, "device": {"data_on_device": True}}


def train_params(size: Size, batch: int, work: Path, device: torch.device, **train: Any):
    """The default (DDPM CIFAR-10) params at this size and batch, on a ``shapes`` dataset under ``work``."""
    from tasks.common.config import validate_params

    m = size.model
    raw = {
        "data": {"source": "shapes", "name": "bench", "count": size.dataset_count, "image_size": m.image_size},
        "model": {k: getattr(m, k) for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")},
        "paths": {"prepared": str(work / "prepared"), "checkpoints": str(work / "ckpt")},
        "train": {
            "batch_size": batch,
            "resume": "never",
            "num_workers": size.num_workers,
            "device": device.type,
            **train,
        },
    }
    return validate_params(raw)


def bench_full(b: Bench, steps: tuple[str, ...]) -> Iterator[dict]:
    """Our whole training step, each of ``steps`` x both data paths, at every batch."""
    from tasks.prepare import build_dataset

    params = train_params(b.size, b.batches[0], b.work, b.device)
    if not (Path(params.paths.prepared) / params.data.name).is_dir():
        build_dataset(params.data, params.paths)
    for batch in b.batches:
        if "compiled" in steps:
            torch._dynamo.reset()  # this batch compiles from scratch (static shapes), as a run at one batch does
        for step, data in itertools.product(steps, DATA_VARIANTS):
            measure = functools.partial(time_whole_step, b, batch, step, data)
            yield attempt(measure, section="train/full", step=step, data=data, batch=batch)


def time_whole_step(b: Bench, batch: int, step: str, data: str) -> dict:
    """One train/full row: ``make_step``'s step function on ``batches``'s batches, as ``tasks.train`` runs
    them (flips, loss, backward, clipping, Adam, EMA; the stats left on the device)."""
    from tasks.train import GraphedStep, batches, build_trainer, make_step

    trainer = build_trainer(train_params(b.size, batch, b.work, b.device, **STEP_VARIANTS[step], **DATA_VARIANTS[data]))
    step_fn, stream = make_step(trainer), batches(trainer, 10**9)

    def one_step() -> None:
        index, x0 = next(stream)
        step_fn(x0, index)

    row: dict[str, Any] = {"what": "train/full", "step": step, "data": data, "precision": trainer.precision}
    try:
        b.measure(row, one_step, batch, warmup=WHOLE_STEP_WARMUP)
    finally:
        stream.close()  # stops the loader's workers
    if step == "graphed":  # whether the timed calls were replays (False off CUDA: the same work, uncaptured)
        row["captured"] = isinstance(step_fn, GraphedStep) and step_fn.whole.graph is not None
    return row


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


class GraphedEps:
    """The eps-model ``model(x, t)`` of a fixed batch shape with its call captured once as a CUDA graph
    (``tasks.common.graphs.Graphed``: 3 eager calls, then the capture) and replayed at every call after: ``x``
    and ``t`` are copied into static buffers first, and the output is cloned, since the next replay writes over
    it. No autograd, autocast without its weight cache (capture needs both). Off CUDA: the eager call."""

    def __init__(self, model: torch.nn.Module, shape: torch.Size, device: torch.device, amp: torch.dtype | None):
        from tasks.common.graphs import Graphed

        self.x = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], dtype=torch.long, device=device)

        def call() -> torch.Tensor:
            with torch.no_grad(), autocast(device, amp, cache=False):
                return model(self.x, self.t)

        self.graphed = Graphed(call, device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        return self.graphed().clone()


def eps_model(model: torch.nn.Module, network: str, x_T: torch.Tensor, amp: torch.dtype | None):
    """``model`` as DDIM's eps-model: ``eager``, ``compiled`` (``torch.compile``, as ``sample.compile`` does) or
    ``graphed`` (:class:`GraphedEps`), under autocast."""
    if network == "graphed":
        return GraphedEps(model, x_T.shape, x_T.device, amp)
    net = torch.compile(model) if network == "compiled" else model

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, amp):
            return net(x, t)

    return eps


def bench_sampling(b: Bench, timed: tuple[str, ...]) -> Iterator[dict]:
    """DDIM (eta 0) at both step counts with the network of each of ``timed`` (eager first, when there), every
    other network's ``max_abs_diff`` against the eager network's images (made untimed when eager is not timed);
    then, with eager timed, the same number of bare network calls on one batch."""
    torch.manual_seed(0)
    model = UNet(b.size.model).to(b.device).eval()
    n, s = b.size.sample_batch, b.size.model.image_size
    x_T = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(0)).to(b.device)
    reference: dict[int, torch.Tensor] = {}
    if "eager" not in timed:
        eager = eps_model(model, "eager", x_T, b.amp)
        reference = {steps: ddim_images(eager, x_T, steps) for steps in b.size.sample_steps}
    for network in timed:
        eps = eps_model(model, network, x_T, b.amp)
        for steps in b.size.sample_steps:
            row, images = time_ddim(b, eps, x_T, steps, network)
            if network == "eager":
                reference[steps] = images
            else:
                row.update(agreement(images, reference[steps], network))
            yield row
    if "eager" in timed:
        yield bare_calls(b, model, x_T)


def ddim_images(eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor, steps: int):
    """DDIM-``steps`` (eta 0, quad spacing, the schedule on the device as the sample stage has it) from ``x_T``
    with the eps-model ``eps``: ``[B, 3, H, W]``."""
    from models.diffusion import ddim_sample, ddim_timesteps

    alphas = on_device_schedule(x_T.device)
    return ddim_sample(eps, x_T, alphas, ddim_timesteps(alphas.shape[0], steps, "quad"))


def time_ddim(b: Bench, eps, x_T: torch.Tensor, steps: int, network: str) -> tuple[dict, torch.Tensor]:
    """A sample/ddim row of :func:`ddim_images` with the eps-model ``eps`` (named ``network``), and its images.
    The shorter step count runs first and warms up (compiles, captures) for the longer."""
    out: dict[str, torch.Tensor] = {}

    def draw() -> None:
        out["x0"] = ddim_images(eps, x_T, steps)

    row: dict[str, Any] = {"what": "sample/ddim", "network": network, "steps": steps, "eta": 0.0}
    with peak_memory(b.device, row):
        sec = seconds_per_iter(draw, b.device, 1, 1, warmup=int(steps == b.size.sample_steps[0]), record=row)
    row.update(batch=x_T.shape[0], images_per_s=x_T.shape[0] / sec)
    return row, out["x0"]


def agreement(images: torch.Tensor, eager: torch.Tensor, network: str) -> dict[str, Any]:
    """The max abs difference from the eager network's images; for graphed ones, whether it is rounding."""
    diff = float((images - eager).abs().max())
    if network != "graphed":
        return {"max_abs_diff": diff}
    agrees = diff <= GRAPH_TOLERANCE * max(1.0, float(eager.abs().max()))
    if not agrees:
        print(f"graphed DDIM differs from eager by {diff:.3g}: the capture is wrong", file=sys.stderr)
    return {"max_abs_diff": diff, "agrees": agrees}


def bare_calls(b: Bench, model: torch.nn.Module, x: torch.Tensor) -> dict:
    """As many eager network calls as DDIM's larger step count, on one batch (already warm from sampling)."""
    steps, t = b.size.sample_steps[1], torch.full((x.shape[0],), 500, device=b.device)

    def calls() -> None:
        with torch.no_grad(), autocast(b.device, b.amp):
            for _ in range(steps):
                model(x, t)

    sec = seconds_per_iter(calls, b.device, 1, 1, warmup=0)
    return {"what": "sample/bare", "steps": steps, "batch": x.shape[0], "images_per_s": x.shape[0] / sec}


def on_device_schedule(device: torch.device) -> torch.Tensor:
    from tasks.common.config import DiffusionConfig
    from tasks.common.devices import on_device

    return on_device(DiffusionConfig().alphas_cumprod(), device)


# ---------------------------------------------------------------------------------------------------------
# Inception features, the Frechet distance
# ---------------------------------------------------------------------------------------------------------


def bench_inception(b: Bench) -> Iterator[dict]:
    """FID feature images/s at the size's Inception batch."""
    from tasks.common.fid import batch_features
    from tasks.common.inception import InceptionError, _fid_inception_skeleton, _init_inception, load_inception

    try:
        model, weights = load_inception(b.device), "pytorch-fid's"
    except InceptionError:
        from pytorch_fid.inception import InceptionV3

        model, weights = InceptionV3.__new__(InceptionV3), "random (speed only)"
        _init_inception(model, _fid_inception_skeleton())
        model = model.to(b.device).eval()
    pixels = torch.rand(b.size.inception_batch, 3, 32, 32, device=b.device)
    sec = seconds_per_iter(lambda: batch_features(model, pixels), b.device, b.size.blocks, 1, warmup=2)
    yield {"what": "inception", "batch": pixels.shape[0], "weights": weights, "images_per_s": pixels.shape[0] / sec}


def frechet_distance_eigh(mu1, sigma1, mu2, sigma2, device: torch.device) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), the last term as the sum of the square roots of
    the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so two float64 ``eigh`` calls instead of a general sqrtm)."""
    a, b = (torch.as_tensor(s, dtype=torch.float64, device=device) for s in (sigma1, sigma2))
    w, v = torch.linalg.eigh(a)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    tr_covmean = torch.linalg.eigvalsh(root @ b @ root).clamp(min=0).sqrt().sum()
    diff = torch.as_tensor(mu1 - mu2, dtype=torch.float64, device=device)
    return float(diff @ diff + a.trace() + b.trace() - 2 * tr_covmean)


def bench_fid(b: Bench) -> Iterator[dict]:
    """The Frechet distance of two Gaussians fitted to random features: scipy's sqrtm beside ``eigh``."""
    from tasks.common.fid import frechet_distance

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2 * b.size.fid_dims, b.size.fid_dims)) + shift for shift in (0.0, 0.1)]
    (mu1, s1), (mu2, s2) = ((f.mean(0), np.cov(f, rowvar=False)) for f in feats)
    start = time.perf_counter()
    scipy_fid = frechet_distance(mu1, s1, mu2, s2)
    scipy_s = time.perf_counter() - start
    frechet_distance_eigh(mu1, s1, mu2, s2, b.device)  # warm-up (the solver's first call loads its library)
    sync(b.device)
    start = time.perf_counter()
    eigh_fid = frechet_distance_eigh(mu1, s1, mu2, s2, b.device)
    yield {
        "what": "fid",
        "dims": b.size.fid_dims,
        "scipy_sqrtm_s": scipy_s,
        "eigh_on_device_s": time.perf_counter() - start,
        "fid": scipy_fid,
        "abs_diff": abs(scipy_fid - eigh_fid),
    }


# The sections, in the order of the default run (the compiled ones last: the compiler's worker processes would
# share the host with the eager measurements).
SECTIONS: dict[str, Callable[[Bench], Iterator[dict]]] = {
    "bare": lambda b: bench_bare(b, compiled=False),
    "full": lambda b: bench_full(b, ("eager", "graphed")),
    "sample": lambda b: bench_sampling(b, ("eager", "graphed")),
    "inception": bench_inception,
    "fid": bench_fid,
    "bare-compiled": lambda b: bench_bare(b, compiled=True),
    "full-compiled": lambda b: bench_full(b, ("compiled",)),
    "sample-compiled": lambda b: bench_sampling(b, ("compiled",)),
}
COMPILED_SECTIONS = ("bare-compiled", "full-compiled", "sample-compiled")


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------

DETAIL_KEYS = ("run", "model", "step", "data", "channels_last", "compile", "network", "precision", "steps", "eta")
DETAIL_KEYS += ("captured", "weights", "section", "error")


def details(r: dict) -> str:
    """A row's settings, as the table's details cell."""
    if r["what"] == "fid":
        return (
            f"{r['dims']}-d: scipy sqrtm {r['scipy_sqrtm_s']:.2f} s, eigh on the device "
            f"{r['eigh_on_device_s']:.2f} s, |diff| {r['abs_diff']:.1e}"
        )
    out = ", ".join(f"{k}={r[k]}" for k in DETAIL_KEYS if k in r)
    if "max_abs_diff" in r:
        out += f", |diff| from eager {r['max_abs_diff']:.1e}" + ("" if r.get("agrees", True) else " (TOO LARGE)")
    return out


def table(rows: list[dict]) -> str:
    """One markdown line per measurement."""
    lines = [
        "| what | details | batch | images/s | steps/s | peak GiB | of matmul peak |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            str(r.get("batch", "")),
            f"{r['images_per_s']:.1f}" if "images_per_s" in r else "",
            f"{r['steps_per_s']:.2f}" if "steps_per_s" in r else "",
            f"{r['peak_gib']}" if r.get("peak_gib") is not None else "",
            f"{r['matmul_fraction']:.1%}" if "matmul_fraction" in r else "",
        ]
        lines.append(f"| {r['what']} | {details(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DDPM_STEPS = 800_000  # DDPM's CIFAR-10 training (Ho et al. 2020, appendix B)


def fastest(rows: list[dict], what: str, batch: int, **match: Any) -> dict | None:
    """The row of ``what`` at ``batch`` (and ``match``'s values) with the most steps/s; None if there is none."""
    found = [r for r in rows if r["what"] == what and r.get("batch") == batch and match.items() <= r.items()]
    return max(found, key=lambda r: r["steps_per_s"], default=None)


def target(name: str, value: float | None, unit: str, goal: float | None = None, **extra: Any) -> dict:
    """One target: its measured ``value`` (None: not measured) and whether it reaches ``goal`` (None: no goal,
    or not measured)."""
    met = None if value is None or goal is None else value >= goal
    return {"target": name, "value": value, "unit": unit, "goal": goal, "met": met, **extra}


def targets(rows: list[dict], small: int, large: int) -> list[dict]:
    """The issue's targets, read off ``rows``: the fastest whole step (any train/full variant) at the ``large``
    batch (>= 40 steps/s, stretch 50) and over diffusers' bare compiled step there (>= 1.3x), at the ``small``
    batch (>= 120 steps/s), each with its matmul fraction; and the time DDPM's 800k steps take at the first."""
    ours, ours_small = fastest(rows, "train/full", large), fastest(rows, "train/full", small)
    theirs = fastest(rows, "train/bare", large, model="diffusers", compile=True)
    rate = None if ours is None else ours["steps_per_s"]
    rate_small = None if ours_small is None else ours_small["steps_per_s"]
    ratio = None if rate is None or theirs is None else rate / theirs["steps_per_s"]
    whole = target(f"whole step, batch {large}", rate, "steps/s", 40, **about(ours))
    whole.update(stretch=50, stretch_met=None if rate is None else rate >= 50)
    over = target(f"whole step over diffusers' bare compiled step, batch {large}", ratio, "x", 1.3)
    over.update({f"theirs_{k}": v for k, v in about(theirs).items()})
    hours = None if rate is None else DDPM_STEPS / rate / 3600
    return [
        whole,
        over,
        target(f"whole step, batch {small}", rate_small, "steps/s", 120, **about(ours_small)),
        target(f"DDPM's {DDPM_STEPS:,} steps at that batch-{large} rate", hours, "hours"),
    ]


def about(r: dict | None) -> dict[str, Any]:
    """What a target says of the row it was read from: its steps/s, matmul fraction and settings."""
    if r is None:
        return {}
    return {"steps_per_s": r["steps_per_s"], "matmul_fraction": r.get("matmul_fraction"), "row": details(r)}


def targets_text(entries: list[dict]) -> str:
    """The targets as a short block of lines."""
    lines = ["targets (read off the rows above):"]
    for t in entries:
        if t["value"] is None:
            lines.append(f"- {t['target']}: not measured")
            continue
        line = f"- {t['target']}: {t['value']:.2f} {t['unit']}"
        if "row" in t:
            line += f" ({t['row']}{fraction(t['matmul_fraction'])})"
        if t.get("theirs_steps_per_s") is not None:
            line += f" (theirs: {t['theirs_steps_per_s']:.2f} steps/s{fraction(t['theirs_matmul_fraction'])})"
        if t["goal"] is not None:
            line += f"; goal >= {t['goal']:g}: {'met' if t['met'] else 'NOT met'}"
        if "stretch" in t:
            line += f"; stretch >= {t['stretch']:g}: {'met' if t['stretch_met'] else 'not met'}"
        lines.append(line)
    return "\n".join(lines)


def fraction(value: float | None) -> str:
    return "" if value is None else f", {value:.1%} of matmul peak"


def time_to_fid(rows: list[dict], count: int = 50_000) -> float | None:
    """Seconds to sample ``count`` images with DDIM at the larger step count (the fastest network measured)
    and score them, from the measured rates (an estimate: the FID's own statistics are not included)."""
    sample = [r for r in rows if r["what"] == "sample/ddim"]
    inception = [r for r in rows if r["what"] == "inception"]
    if not sample or not inception:
        return None
    many = max(r["steps"] for r in sample)
    best = max((r for r in sample if r["steps"] == many), key=lambda r: r["images_per_s"])
    return count / best["images_per_s"] + count / inception[0]["images_per_s"]


def finish(report: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Add the targets and the FID-time estimate; write the JSON (when ``path``); print the head, the table and
    the targets."""
    rows = report["rows"]
    report["time_to_fid_50k_s_estimate"] = time_to_fid(rows)
    report["targets"] = targets(rows, *report["target_batches"])
    if path:
        path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("rows", "targets", "runs")}))
    print(table(rows))
    print(targets_text(report["targets"]))
    return report


def merged(paths: list[Path]) -> dict[str, Any]:
    """Saved reports as one: their heads under ``runs``, their rows (numbered by run when more than one)."""
    reports = [json.loads(p.read_text()) for p in paths]
    rows = [{**r, "run": i + 1} if len(reports) > 1 else r for i, rep in enumerate(reports) for r in rep["rows"]]
    runs = [{k: v for k, v in rep.items() if k not in ("rows", "targets")} for rep in reports]
    return {"runs": runs, "target_batches": reports[0]["target_batches"], "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The host CPU's model name (the eager steps are bound by it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def progress(start: float, section: str, row: dict) -> None:
    """One line on stderr per measurement: seconds since the start, what, and its main figure."""
    figure = f"{row['steps_per_s']:.2f} steps/s" if "steps_per_s" in row else ""
    figure = figure or (f"{row['images_per_s']:.1f} images/s" if "images_per_s" in row else "done")
    warm = f", warm-up {row['warmup_s']:.1f} s" if "warmup_s" in row else ""
    where = f" batch {row['batch']}" if "batch" in row else ""
    elapsed = time.perf_counter() - start
    print(f"[{elapsed:7.1f} s] {section}: {details(row)}{where}: {figure}{warm}", file=sys.stderr, flush=True)


def section_rows(b: Bench, name: str) -> Iterator[dict]:
    """The rows of section ``name``; where it raises, an error row last (the sections after it still run)."""
    rows = SECTIONS[name](b)
    # A generator that raised is finished: the next call of next() gives None, as at its normal end.
    while (row := attempt(functools.partial(next, rows, None), section=name)) is not None:
        yield row


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu on a CUDA device, else cpu")
    parser.add_argument("--json", type=Path, help="also write the report here (after every measurement)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SECTIONS),
        help="sections, in order (default: all; the compiled ones at the gpu size only)",
    )
    parser.add_argument("--batches", nargs="+", type=int, help="per-GPU train batches (default: the size's)")
    parser.add_argument("--report", nargs="+", type=Path, help="measure nothing: table and targets of these JSONs")
    args = parser.parse_args(argv)
    if args.batches and min(args.batches) < 1:
        parser.error(f"--batches must be positive, not {args.batches}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.report:
        return finish(merged(args.report), args.json)
    from tasks.common.devices import set_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size_name = args.size or ("gpu" if device.type == "cuda" else "cpu")
    size, start = SIZES[size_name], time.perf_counter()
    amp, precision = set_precision("auto", device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the train stage has it (train.deterministic false)
    peak = matmul_tflops(device, size.matmul_n, amp or torch.float32)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "host_cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": size_name,
        "precision": precision,
        "matmul_tflops": {"dtype": str(amp or torch.float32), "n": size.matmul_n, "tflops": peak},
        "target_batches": list(size.target_batches),
        "rows": [],
    }
    sections = args.only or [s for s in SECTIONS if size.compile or s not in COMPILED_SECTIONS]
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(size, tuple(args.batches or size.train_batches), device, amp, peak, Path(tmp), report["rows"])
        for name in sections:
            for row in section_rows(bench, name):
                bench.rows.append(row)
                progress(start, name, row)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=2))
    report["seconds"] = round(time.perf_counter() - start, 1)
    return finish(report, args.json)


if __name__ == "__main__":
    main()
