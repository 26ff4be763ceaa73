"""The sample stage: generate ``sample.num_samples`` images from ``model.pt`` with DDIM or the adaptive sampler.

Image i starts from the noise of ``torch.Generator().manual_seed(sample.seed + i)`` (drawn on the CPU, so the
same on every device) and, when ``eta > 0``, takes its step noise from that generator too: it is the same
image whatever the batch size. Output in ``paths.samples``:

- ``images/{i:06d}.png``, each written atomically (no truncated PNG, ever);
- ``grid.png``: the first 64; ``sample_stats.json``: NFE mean/min/max, wall time, images/s;
- ``nfe.npy`` (model evaluations per image) and ``config.json`` (what made the images), which let a rerun after
  a kill continue after the last complete batch; a different config starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.diffusion import adaptive_ddim_sample, ddim_sample, ddim_timesteps
from tasks.config import Params, SampleConfig
from tasks.data import file_hash, to_uint8, write_json
from tasks.devices import autocast_dtype, pick_device
from tasks.errors import UserError
from tasks.images import atomic_path, make_grid, save_png
from tasks.train import alphas_cumprod_for, load_model

IMAGES = "images"


class SamplingError(UserError):
    """Sampling cannot run with these inputs."""


def image_path(folder: Path, index: int) -> Path:
    return folder / IMAGES / f"{index:06d}.png"


def completed_prefix(folder: Path, total: int) -> int:
    """How many images ``0..k-1`` already exist (each PNG is written atomically, so existing ones are whole)."""
    k = 0
    while k < total and image_path(folder, k).is_file():
        k += 1
    return k


def sample_images(
    model: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    cfg: SampleConfig,
    indices: range,
    image_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` as ``[B, 3, H, W]`` in [-1, 1] and their model evaluations ``[B]``."""
    generators = [torch.Generator().manual_seed(cfg.seed + i) for i in indices]
    x_T = torch.stack([torch.randn(3, image_size, image_size, generator=g) for g in generators]).to(device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if cfg.sampler == "ddim":
            T = alphas_cumprod.shape[0]
            timesteps = ddim_timesteps(T, cfg.steps, cfg.spacing)
            x0 = ddim_sample(model, x_T, alphas_cumprod, timesteps, cfg.eta, cfg.clip_x0, generators)
            nfe = torch.full((len(indices),), len(timesteps), dtype=torch.long)
        else:
            x0, nfe = adaptive_ddim_sample(
                model,
                x_T,
                alphas_cumprod,
                cfg.base_step_size,
                cfg.min_step,
                cfg.max_step,
                cfg.eta,
                cfg.clip_x0,
                cfg.complexity_mode,
                generators,
            )
    return x0.float(), nfe.cpu()


def run_sampling(params: Params, *, stop_after_batches: int | None = None) -> dict[str, Any]:
    """Generate the configured samples (continuing an interrupted run) and return ``sample_stats``."""
    cfg = params.sample
    model_path = Path(params.paths.train) / "model.pt"
    if not model_path.is_file():
        raise SamplingError(f"{model_path} not found: run `ddim train` first")
    device = pick_device(cfg.device)
    model, state = load_model(model_path, device)
    if params.diffusion.model_dump() != state["diffusion"]:
        raise SamplingError(f"{model_path} was trained with diffusion={state['diffusion']}, params say otherwise")
    image_size = state["model_config"]["image_size"]
    alphas_cumprod = alphas_cumprod_for(params.diffusion).to(device)

    out = Path(params.paths.samples)
    identity = {"sample": cfg.model_dump(), "model_sha256": file_hash(model_path, "sha256")}
    config_path = out / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()) != identity:
        shutil.rmtree(out)  # made by another config or model: start over
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    write_json(identity, config_path)

    nfe_path = out / "nfe.npy"
    nfe = np.load(nfe_path) if nfe_path.is_file() else np.zeros(cfg.num_samples, dtype=np.int64)
    if len(nfe) != cfg.num_samples:
        nfe = np.zeros(cfg.num_samples, dtype=np.int64)
    # Continue from the start of the batch holding the first missing image, so batches match an
    # uninterrupted run (the adaptive sampler's design mode couples the samples of a batch).
    start = completed_prefix(out, cfg.num_samples) // cfg.batch_size * cfg.batch_size
    begin = time.perf_counter()
    generated = 0
    bar = tqdm(total=cfg.num_samples, initial=start, desc="sample", unit="img")
    for batch, first in enumerate(range(start, cfg.num_samples, cfg.batch_size)):
        if stop_after_batches is not None and batch >= stop_after_batches:
            break
        indices = range(first, min(first + cfg.batch_size, cfg.num_samples))
        x0, batch_nfe = sample_images(model, alphas_cumprod, cfg, indices, image_size, device)
        for i, img in zip(indices, to_uint8(x0), strict=True):
            save_png(img, image_path(out, i))
        nfe[indices.start : indices.stop] = batch_nfe.numpy()
        with atomic_path(nfe_path) as tmp, open(tmp, "wb") as f:
            np.save(f, nfe)
        generated += len(indices)
        bar.update(len(indices))
    bar.close()
    seconds = time.perf_counter() - begin

    done = completed_prefix(out, cfg.num_samples)
    stats = {
        "num_samples": done,
        "complete": done == cfg.num_samples,
        "sampler": cfg.sampler,
        "steps": cfg.steps if cfg.sampler == "ddim" else None,
        "eta": cfg.eta,
        "spacing": cfg.spacing if cfg.sampler == "ddim" else None,
        "nfe_mean": float(nfe[:done].mean()) if done else None,
        "nfe_min": int(nfe[:done].min()) if done else None,
        "nfe_max": int(nfe[:done].max()) if done else None,
        "wall_seconds": round(seconds, 2),
        "images_generated_now": generated,
        "images_per_s": round(generated / seconds, 2) if generated else None,
        "device": str(device),
    }
    if done:
        first64 = np.stack([np.asarray(_read_png(image_path(out, i))) for i in range(min(64, done))])
        save_png(make_grid(first64), out / "grid.png")
    write_json(stats, out / "sample_stats.json")
    return stats


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
