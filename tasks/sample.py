"""The sample stage: generate ``sample.num_samples`` images from ``model.pt`` with DDIM or the adaptive sampler.

Image i starts from the noise of a generator seeded from (``sample.seed``, i) (drawn on the CPU, so the same on
every device) and, when ``eta > 0``, takes its step noise from that generator too: it is the same image
whatever the batch size, and two seeds never share an image's noise. Output in ``paths.samples``:

- ``images/{i:06d}.png``, each written atomically (no truncated PNG, ever);
- ``grid.png``: the first 64; ``sample_stats.json``: NFE mean/min/max, wall time, images/s;
- ``nfe.npy`` (model evaluations per image) and ``config.json`` (what made the images), which let a rerun after
  a kill continue after the last complete batch; a different config starts over. A rerun that finds every
  image already made by the same config and model changes nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.diffusion import adaptive_ddim_sample, ddim_sample, ddim_timesteps
from tasks.checkpoint import MODEL_FILE, load_model
from tasks.config import Params, SampleConfig
from tasks.devices import on_device, pick_device, set_precision
from tasks.errors import UserError
from tasks.files import atomic_path, file_hash, write_json
from tasks.images import make_grid, read_png, save_png, to_uint8
from tasks.seeds import derive_seed

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
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` as ``[B, 3, H, W]`` in [-1, 1] and their model evaluations ``[B]``."""
    generators = [torch.Generator().manual_seed(derive_seed(cfg.seed, i)) for i in indices]
    x_T = torch.stack([torch.randn(3, image_size, image_size, generator=g) for g in generators]).to(device)
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


def sampling_identity(cfg: SampleConfig, model_path: Path) -> dict[str, Any]:
    """What makes the images: the sampling keys that can change them, and the model file's sha256."""
    return {"sample": cfg.model_dump(include=set(cfg.result_keys())), "model_sha256": file_hash(model_path)}


def open_output(out: Path, identity: dict[str, Any], num_samples: int) -> dict[str, Any] | None:
    """Make ``out`` ready for the images ``identity`` describes; their stats if every one is already there.

    A folder whose ``config.json`` records another config or model starts over.
    """
    config_path, stats_path = out / "config.json", out / "sample_stats.json"
    if config_path.is_file() and json.loads(config_path.read_text()) != identity:
        shutil.rmtree(out)
    elif config_path.is_file() and stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if stats["complete"] and completed_prefix(out, num_samples) == num_samples:
            return stats
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    write_json(identity, config_path)
    return None


def generate(
    model: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    cfg: SampleConfig,
    out: Path,
    image_size: int,
    amp_dtype: torch.dtype | None,
    stop_after_batches: int | None = None,
) -> tuple[np.ndarray, int]:
    """Write the missing images of ``out`` batch by batch; return the model evaluations of every image and
    how many images this call made.

    It continues from the start of the batch holding the first missing image, so batches match an
    uninterrupted run (the adaptive sampler's design mode couples the samples of a batch).
    """
    nfe_path, device = out / "nfe.npy", next(model.parameters()).device
    nfe = np.load(nfe_path) if nfe_path.is_file() else np.zeros(cfg.num_samples, dtype=np.int64)
    if len(nfe) != cfg.num_samples:
        nfe = np.zeros(cfg.num_samples, dtype=np.int64)
    start = completed_prefix(out, cfg.num_samples) // cfg.batch_size * cfg.batch_size
    firsts = range(start, cfg.num_samples, cfg.batch_size)[:stop_after_batches]
    generated = 0
    with tqdm(total=cfg.num_samples, initial=start, desc="sample", unit="img") as bar:
        for first in firsts:
            indices = range(first, min(first + cfg.batch_size, cfg.num_samples))
            x0, batch_nfe = sample_images(model, alphas_cumprod, cfg, indices, image_size, device, amp_dtype)
            for i, img in zip(indices, to_uint8(x0), strict=True):
                save_png(img, image_path(out, i))
            nfe[indices.start : indices.stop] = batch_nfe.numpy()
            with atomic_path(nfe_path) as tmp, open(tmp, "wb") as f:
                np.save(f, nfe)
            generated += len(indices)
            bar.update(len(indices))
    return nfe, generated


def run_sampling(params: Params, *, stop_after_batches: int | None = None) -> dict[str, Any]:
    """Generate the configured samples (continuing an interrupted run) and return ``sample_stats``."""
    cfg = params.sample
    model_path = Path(params.paths.train) / MODEL_FILE
    device = pick_device(cfg.device)
    model, state = load_model(model_path, device)
    if params.diffusion.model_dump() != state.get("diffusion"):
        raise SamplingError(f"{model_path} was trained with diffusion={state.get('diffusion')}, params say otherwise")
    out = Path(params.paths.samples)
    finished = open_output(out, sampling_identity(cfg, model_path), cfg.num_samples)
    if finished is not None:
        return finished  # every image is there, made by this config and model: nothing to do

    amp_dtype, precision = set_precision(cfg.precision, device)
    alphas_cumprod = on_device(params.diffusion.alphas_cumprod(), device)
    begin = time.perf_counter()
    image_size = state["model_config"]["image_size"]
    nfe, generated = generate(model, alphas_cumprod, cfg, out, image_size, amp_dtype, stop_after_batches)
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
        "precision": precision,
    }
    if done:
        first64 = np.stack([read_png(image_path(out, i)) for i in range(min(64, done))])
        save_png(make_grid(first64), out / "grid.png")
    write_json(stats, out / "sample_stats.json")
    return stats
