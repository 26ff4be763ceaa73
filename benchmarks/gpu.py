"""Speed on whatever device this finds: training, sampling and FID features, ours beside diffusers. Table + JSON.

    python benchmarks/gpu.py                      # a CUDA GPU: the full size; else a small CPU version
    python benchmarks/gpu.py --size cpu --json out.json
    python benchmarks/gpu.py --size tiny          # seconds: what the test suite runs

What it measures, each as the median of several timed blocks after warm-up (the GPU synchronised around
each block):
- train/bare: forward + MSE + backward of the U-Net alone (random batch already on the device), ours and
  diffusers' ``UNet2DModel`` at the same config (``models.weights.diffusers_config``) and precision, in
  both memory formats, then each compiled in its faster format; the images/s, the peak memory, and the
  fraction of the device's measured matmul rate that the counted FLOPs reach.
- train/full: our real training step (``tasks.train.train_step``: data from the prepared-dataset loader,
  flips, loss, Adam, grad clipping, EMA) on a ``shapes`` dataset, with the step's variants: as configured,
  the batch already on the device (what the data path costs), a fused Adam, channels-first, compiled.
- sample: DDIM at 10 and 100 steps (eta 0, and eta 1 at 100) through ``tasks.common.inference.sample_images``
  (per-image seeds) beside the same number of bare model calls on one batch.
- inception: FID feature images/s (``tasks.common.fid.batch_features``, 32 px images resized to 299). Speed does
  not depend on the weights: without pytorch-fid's weights installed, random ones are used (and said so).
- fid: the Frechet distance of two 2048-d Gaussians, scipy's ``sqrtm`` (``tasks.common.fid.frechet_distance``)
  beside a float64 eigenvalue form on the device, and their difference.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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
    train_batch: int
    sample_batch: int
    sample_steps: tuple[int, int]
    inception_batch: int
    fid_dims: int
    blocks: int  # timed blocks per measurement (the median is reported)
    iters: int  # iterations per block
    compile: bool
    matmul_n: int
    dataset_count: int
    num_workers: int


SIZES = {
    "gpu": Size(UNetConfig.ddpm_cifar10(), 128, 1000, (10, 100), 500, 2048, 5, 20, True, 8192, 4096, 4),
    "cpu": Size(UNetConfig(ch=32, attn_resolutions=(16,)), 8, 8, (10, 100), 16, 2048, 3, 2, False, 1024, 64, 0),
    "tiny": Size(
        UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)),
        2,
        2,
        (2, 3),
        2,
        64,
        2,
        1,
        False,
        128,
        8,
        0,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_iter(fn: Callable[[], Any], device: torch.device, blocks: int, iters: int, warmup: int = 2) -> float:
    """Median over ``blocks`` of (block time / ``iters``), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
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
    """Records the peak allocated GPU memory (GiB) of the block in ``out["peak_gib"]`` (None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """The measured rate of one n x n x n matrix product (random operands), TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds_per_iter(lambda: a @ b, device, 5, 5) / 1e12


# ---------------------------------------------------------------------------------------------------------
# Training: the bare network, ours and diffusers'
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


def eps_of(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out if isinstance(out, torch.Tensor) else out.sample  # diffusers returns a UNet2DOutput


def bare_step_fn(model: torch.nn.Module, batch: int, device: torch.device, amp: torch.dtype | None, cl: bool):
    """forward + MSE + backward on a fixed random batch (gradients dropped each time, as zero_grad does)."""
    size, fmt = model_size(model), torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    t, noise = torch.randint(0, 1000, (batch,), device=device), torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.mse_loss(eps_of(model, x, t).float(), noise)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def model_size(model: torch.nn.Module) -> int:
    config = model.config
    return config.image_size if isinstance(config, UNetConfig) else config["sample_size"]


def train_flops(model: torch.nn.Module, batch: int, device: torch.device, amp: torch.dtype | None) -> float:
    """FLOPs of one forward + backward at ``batch`` (matrix products and convolutions, as PyTorch counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bare_step_fn(model, batch, device, amp, False)()
    return float(counter.get_total_flops())


def bench_bare(
    size: Size, device: torch.device, amp: torch.dtype | None, peak_tflops: float, eager: list[dict] | None = None
) -> list[dict]:
    """Each network eager in both memory formats; or, given those ``eager`` rows, compiled in its faster one."""
    rows = []
    for name, build in networks(size.model).items():
        torch.manual_seed(0)
        model = build().to(device).train()
        flops = train_flops(model, size.train_batch, device, amp)
        if eager is None:
            formats = (False, True)
        else:
            mine = [r for r in eager if r["model"] == name]
            formats = (max(mine, key=lambda r: r["images_per_s"])["channels_last"],)
        for cl in formats:
            net = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            compiled = eager is not None
            row: dict[str, Any] = {"what": "train/bare", "model": name, "channels_last": cl, "compile": compiled}
            with peak_memory(device, row):
                step = bare_step_fn(torch.compile(net) if compiled else net, size.train_batch, device, amp, cl)
                sec = seconds_per_iter(step, device, size.blocks, size.iters, warmup=3)
            row.update(images_per_s=size.train_batch / sec, steps_per_s=1 / sec)
            row["matmul_fraction"] = flops / sec / 1e12 / peak_tflops
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Training: our whole step
# ---------------------------------------------------------------------------------------------------------


def train_params(size: Size, work: Path, device: torch.device, **train: Any):
    """The default (DDPM CIFAR-10) params at this size, on a ``shapes`` dataset under ``work``."""
    from tasks.common.config import validate_params

    m = size.model
    raw = {
        "data": {"source": "shapes", "name": "bench", "count": size.dataset_count, "image_size": m.image_size},
        "model": {k: getattr(m, k) for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")},
        "paths": {"prepared": str(work / "prepared"), "checkpoints": str(work / "ckpt")},
        "train": {
            "batch_size": size.train_batch,
            "resume": "never",
            "num_workers": size.num_workers,
            "device": device.type,
            "compile": False,
            **train,
        },
    }
    return validate_params(raw)


VARIANTS = {
    "as configured": {},
    "batch already on the device": {"staged": True},
    "fused Adam": {"fused": True},
    "channels-first": {"channels_last": False},
    "compiled": {"compile": True},
}


def bench_full(size: Size, device: torch.device, work: Path, compiled: bool = False) -> list[dict]:
    """Our training step (tasks.train.train_step) and its variants (the compiled one alone if ``compiled``),
    steps/s over size.blocks x size.iters."""
    from tasks.prepare import build_dataset

    params = train_params(size, work, device)
    if not (Path(params.paths.prepared) / params.data.name).is_dir():
        build_dataset(params.data, params.paths)
    return [
        time_variant(size, device, work, name, variant)
        for name, variant in VARIANTS.items()
        if bool(variant.get("compile")) == compiled and (device.type == "cuda" or not variant.get("fused"))
    ]


def time_variant(size: Size, device: torch.device, work: Path, name: str, variant: dict[str, Any]) -> dict:
    from tasks.train import batches, build_trainer, train_step

    settings = {k: v for k, v in variant.items() if k in ("channels_last", "compile")}
    run = build_trainer(train_params(size, work, device, **settings))
    if variant.get("fused"):
        run.optimizer = torch.optim.Adam(run.model.parameters(), lr=run.cfg.lr, fused=True)
    data = batches(run, 10**9)
    staged = next(data)[1].to(device)
    step_no = iter(range(10**9))

    def step() -> None:
        step_index, x0 = next(step_no), staged if variant.get("staged") else next(data)[1]
        train_step(run, x0, step_index)

    row: dict[str, Any] = {"what": "train/full", "variant": name, "precision": run.precision}
    with peak_memory(device, row):
        sec = seconds_per_iter(step, device, size.blocks, size.iters, warmup=3)
    data.close()  # stops the loader's workers
    row.update(images_per_s=size.train_batch / sec, steps_per_s=1 / sec)
    return row


# ---------------------------------------------------------------------------------------------------------
# Sampling, Inception features, the Frechet distance
# ---------------------------------------------------------------------------------------------------------


def bench_sampling(size: Size, device: torch.device, amp: torch.dtype | None, compiled: bool = False) -> list[dict]:
    """DDIM through the sample stage's call beside the same number of bare network calls (or, ``compiled``,
    DDIM with the network compiled)."""
    from tasks.common.config import SampleConfig
    from tasks.common.inference import sample_images

    torch.manual_seed(0)
    model = UNet(size.model).to(device).eval()
    network = torch.compile(model) if compiled else model
    alphas = on_device_schedule(device)
    n, s = size.sample_batch, size.model.image_size
    few, many = size.sample_steps
    rows = []
    for steps, eta in ((few, 0.0), (many, 0.0)) if compiled else ((few, 0.0), (many, 0.0), (many, 1.0)):
        cfg = SampleConfig(steps=steps, eta=eta, spacing="quad", batch_size=n)
        with torch.inference_mode():
            sec = seconds_per_iter(
                functools.partial(sample_images, network, alphas, cfg, list(range(n)), amp), device, 1, 1, 1
            )
        rows.append({"what": "sample/ours", "steps": steps, "eta": eta, "compile": compiled, "images_per_s": n / sec})
    if compiled:
        return rows
    x, t = torch.randn(n, 3, s, s, device=device), torch.full((n,), 500, device=device)

    def bare() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for _ in range(many):
                model(x, t)

    rows.append({"what": "sample/bare", "steps": many, "images_per_s": n / seconds_per_iter(bare, device, 1, 1, 1)})
    return rows


def on_device_schedule(device: torch.device) -> torch.Tensor:
    from tasks.common.config import DiffusionConfig
    from tasks.common.devices import on_device

    return on_device(DiffusionConfig().alphas_cumprod(), device)


def bench_inception(size: Size, device: torch.device) -> dict:
    from tasks.common.fid import batch_features
    from tasks.common.inception import InceptionError, _fid_inception_skeleton, _init_inception, load_inception

    try:
        model, weights = load_inception(device), "pytorch-fid's"
    except InceptionError:
        from pytorch_fid.inception import InceptionV3

        model, weights = InceptionV3.__new__(InceptionV3), "random (speed only)"
        _init_inception(model, _fid_inception_skeleton())
        model = model.to(device).eval()
    pixels = torch.rand(size.inception_batch, 3, 32, 32, device=device)
    sec = seconds_per_iter(lambda: batch_features(model, pixels), device, size.blocks, 1, warmup=2)
    return {
        "what": "inception",
        "batch": size.inception_batch,
        "weights": weights,
        "images_per_s": pixels.shape[0] / sec,
    }


def frechet_distance_eigh(mu1, sigma1, mu2, sigma2, device: torch.device) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), the last term as the sum of the square roots of
    the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so two float64 ``eigh`` calls instead of a general sqrtm)."""
    a, b = (torch.as_tensor(s, dtype=torch.float64, device=device) for s in (sigma1, sigma2))
    w, v = torch.linalg.eigh(a)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    tr_covmean = torch.linalg.eigvalsh(root @ b @ root).clamp(min=0).sqrt().sum()
    diff = torch.as_tensor(mu1 - mu2, dtype=torch.float64, device=device)
    return float(diff @ diff + a.trace() + b.trace() - 2 * tr_covmean)


def bench_fid(size: Size, device: torch.device) -> dict:
    from tasks.common.fid import frechet_distance

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2 * size.fid_dims, size.fid_dims)) + shift for shift in (0.0, 0.1)]
    (mu1, s1), (mu2, s2) = ((f.mean(0), np.cov(f, rowvar=False)) for f in feats)
    start = time.perf_counter()
    scipy_fid = frechet_distance(mu1, s1, mu2, s2)
    scipy_s = time.perf_counter() - start
    frechet_distance_eigh(mu1, s1, mu2, s2, device)  # warm-up (the solver's first call loads its library)
    sync(device)
    start = time.perf_counter()
    eigh_fid = frechet_distance_eigh(mu1, s1, mu2, s2, device)
    eigh_s = time.perf_counter() - start
    return {
        "what": "fid",
        "dims": size.fid_dims,
        "scipy_sqrtm_s": scipy_s,
        "eigh_on_device_s": eigh_s,
        "fid": scipy_fid,
        "abs_diff": abs(scipy_fid - eigh_fid),
    }


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------

DETAIL_KEYS = ("model", "variant", "channels_last", "compile", "precision", "steps", "eta", "batch", "weights")


def table(rows: list[dict]) -> str:
    """One markdown line per measurement."""
    lines = ["| what | details | images/s | steps/s | peak GiB | of matmul peak |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        details = ", ".join(f"{k}={r[k]}" for k in DETAIL_KEYS if k in r)
        if r["what"] == "fid":
            details = f"{r['dims']}-d: scipy sqrtm {r['scipy_sqrtm_s']:.2f} s, eigh on the device "
            details += f"{r['eigh_on_device_s']:.2f} s, |diff| {r['abs_diff']:.1e}"
        cells = [
            f"{r['images_per_s']:.1f}" if "images_per_s" in r else "",
            f"{r['steps_per_s']:.2f}" if "steps_per_s" in r else "",
            f"{r['peak_gib']}" if r.get("peak_gib") is not None else "",
            f"{r['matmul_fraction']:.1%}" if "matmul_fraction" in r else "",
        ]
        lines.append(f"| {r['what']} | {details} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_to_fid(rows: list[dict], count: int = 50_000) -> float | None:
    """Seconds to sample ``count`` images with DDIM at the larger step count (eta 0) and score them, from the
    measured rates (an estimate: the FID's own statistics and the reference are not included)."""
    sample = [r for r in rows if r["what"] == "sample/ours" and r["eta"] == 0.0 and not r["compile"]]
    inception = [r for r in rows if r["what"] == "inception"]
    if not sample or not inception:
        return None
    return count / max(sample, key=lambda r: r["steps"])["images_per_s"] + count / inception[0]["images_per_s"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu on a CUDA device, else cpu")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--only", nargs="*", help="sections, in order (default: all; compiled last, on the GPU only)")
    args = parser.parse_args(argv)

    from tasks.common.devices import set_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[args.size or ("gpu" if device.type == "cuda" else "cpu")]
    amp, precision = set_precision("auto", device)
    peak_dtype = amp or torch.float32
    peak = matmul_tflops(device, size.matmul_n, peak_dtype)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size or ("gpu" if device.type == "cuda" else "cpu"),
        "precision": precision,
        "matmul_tflops": {"dtype": str(peak_dtype), "n": size.matmul_n, "tflops": peak},
        "rows": [],
    }
    rows = report["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        sections = {
            "bare": lambda: bench_bare(size, device, amp, peak),
            "full": lambda: bench_full(size, device, Path(tmp)),
            "sample": lambda: bench_sampling(size, device, amp),
            "inception": lambda: [bench_inception(size, device)],
            "fid": lambda: [bench_fid(size, device)],
            "bare-compiled": lambda: bench_bare(
                size, device, amp, peak, [r for r in rows if r["what"] == "train/bare"]
            ),
            "full-compiled": lambda: bench_full(size, device, Path(tmp), compiled=True),
            "sample-compiled": lambda: bench_sampling(size, device, amp, compiled=True),
        }
        default = ["bare", "full", "sample", "inception", "fid"]
        default += ["sample-compiled", "bare-compiled", "full-compiled"] if size.compile else []
        for name in args.only or default:
            rows.extend(sections[name]())
            print(f"[{name} done]", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
    report["time_to_fid_50k_s_estimate"] = time_to_fid(rows)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    head = {k: v for k, v in report.items() if k != "rows"}
    print(json.dumps(head))
    print(table(rows))
    return report


if __name__ == "__main__":
    main()
