"""The sweep stage: one cell of DDIM's grid of steps x eta from ``model.pt``, and its FID.

Each cell (``ddim sweep-cell --steps S --eta E``, one DVC stage instance of the ``sweep`` matrix) draws
``sweep.num_samples`` images and computes their FID against the reference statistics in the same pass: each
batch is quantised to uint8 exactly as a PNG would store it and goes straight to Inception, whose features
are merged into running statistics (``tasks.common.fid.FeatureStats``), so no image is written unless
``sweep.images`` asks for them. Under ``torchrun`` the images are split by index and the statistics merged
across processes: the same images and the same FID as one process. The table is ``tasks/sweep_table.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from models.diffusion import ddim_timesteps
from tasks.common.config import Params, SampleConfig
from tasks.common.devices import pick_device
from tasks.common.distributed import Ranks
from tasks.common.fid import FeatureStats, batch_features, frechet_distance, load_stats, reference_path, warn_if_biased
from tasks.common.files import write_json
from tasks.common.grid import cell_path
from tasks.common.images import save_png, to_uint8
from tasks.common.inception import load_inception
from tasks.common.inference import batches, load_inference
from tasks.common.tracking import log_evaluation, read_run_id


def cell_config(params: Params, steps: int, eta: float) -> SampleConfig:
    """The sample section as this cell uses it: DDIM, the cell's steps and eta, the sweep's spacing and count."""
    s = params.sweep
    update = {"sampler": "ddim", "steps": steps, "eta": eta, "spacing": s.spacing}
    return params.sample.model_copy(update={**update, "num_samples": s.num_samples, "batch_size": s.batch_size})


def sample_and_score(
    params: Params, cfg: SampleConfig, ranks: Ranks, device: torch.device, images: Path | None
) -> tuple[FeatureStats, int]:
    """Draw this process's share of the cell's images and merge their Inception features into statistics
    (``images``: write the images there as PNGs too); also the model evaluations those images took."""
    net = load_inference(params, device)  # the cell's precision and device are the sample section's
    inception, stats, nfe = load_inception(device), FeatureStats(device=device), 0
    for indices in batches(ranks.share(cfg.num_samples), cfg.batch_size):
        x0, evaluations = net.sample(cfg, indices)
        nfe += int(evaluations.sum())
        u8 = to_uint8(x0)  # exactly what a PNG of the image would hold
        stats.add(batch_features(inception, torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(255.0)))
        if images is not None:
            for i, img in zip(indices, u8, strict=True):
                save_png(img, images / f"{i:06d}.png")
    return stats, nfe


def run(params: Params, steps: int, eta: float) -> dict[str, Any]:
    """One cell of the sweep: its FID (written to its JSON file and an MLflow child run) and how it was made."""
    cfg, ranks = cell_config(params, steps, eta), Ranks.from_env()
    device = pick_device(cfg.device, ranks.local_rank)
    ranks.start(device)
    try:
        mu_ref, sigma_ref, ref_count = load_stats(reference_path(params))
        start = time.perf_counter()
        images = cell_path(params, steps, eta).with_suffix("") if params.sweep.images else None
        stats, _ = sample_and_score(params, cfg, ranks, device, images)
        stats.reduce()
        seconds = time.perf_counter() - start
    finally:
        ranks.finish()
    if not ranks.is_main:
        return {}
    warn_if_biased(stats.count)
    mu, sigma = stats.mean_and_covariance()
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)  # an error if it is not finite
    cell = {
        "steps": steps,
        "eta": eta,
        "spacing": cfg.spacing,
        "nfe": len(ddim_timesteps(params.diffusion.num_train_steps, steps, cfg.spacing)),  # quad drops repeats
        "fid": fid,
        "num_samples": stats.count,
        "reference_count": ref_count,
        "processes": ranks.world_size,
    }
    write_json(cell, cell_path(params, steps, eta))  # the result; how long it took goes to MLflow only
    sampling = {"sampler": "ddim", **{k: cell[k] for k in ("steps", "eta", "spacing", "num_samples")}}
    cell["seconds"] = round(seconds, 1)
    metrics = {**cell, "sampler": "ddim"}
    cell["mlflow_run_id"] = log_evaluation(
        params.tracking, read_run_id(Path(params.paths.train)), {"sample": sampling, "sweep": True}, metrics, None
    )
    return cell
