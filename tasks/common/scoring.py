"""One sweep cell's work, for both of the sweep's cell stages (``tasks/sweep.py``, ``tasks/sweep_solver.py``):
draw the cell's images and compute their FID against the reference statistics in the same pass, then record it.

Each batch is quantised to uint8 exactly as a PNG would store it and goes straight to Inception, whose features
are merged into running statistics (``tasks.common.fid.FeatureStats``), so no image is written unless
``sweep.images`` asks for them. Under ``torchrun`` the images are split by index and the statistics merged
across processes: the same images and the same FID as one process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from models.diffusion import ddim_timesteps
from tasks.common.checkpoint import MODEL_FILE
from tasks.common.config import Params, SampleConfig
from tasks.common.devices import pick_device
from tasks.common.distributed import Ranks
from tasks.common.fid import FeatureStats, batch_features, frechet_distance, load_stats, reference_path, warn_if_biased
from tasks.common.files import file_hash, write_json
from tasks.common.images import save_png, to_uint8
from tasks.common.inception import load_inception
from tasks.common.inference import InferenceModel, batches, load_inference
from tasks.common.tracking import log_evaluation, read_run_id


def cell_config(params: Params, **sampler: Any) -> SampleConfig:
    """The sample section as a cell uses it: the cell's sampler settings, the sweep's spacing and image count."""
    s = params.sweep
    update = {**sampler, "spacing": s.spacing, "num_samples": s.num_samples, "batch_size": s.batch_size}
    return params.sample.model_copy(update=update)


def sample_and_score(
    params: Params, cfg: SampleConfig, ranks: Ranks, device: torch.device, images: Path | None
) -> tuple[FeatureStats, int]:
    """Draw this process's share of the cell's images and merge their Inception features into statistics
    (``images``: write the images there as PNGs too); also the model evaluations those images took."""
    net = load_inference(params, device)  # the cell's precision and device are the sample section's
    return draw_features(net, cfg, ranks, load_inception(device), images)


def draw_features(
    net: InferenceModel, cfg: SampleConfig, ranks: Ranks, inception: torch.nn.Module, images: Path | None = None
) -> tuple[FeatureStats, int]:
    """This process's share of ``cfg.num_samples`` images of ``net``, drawn as ``cfg`` says, as Inception
    statistics (not yet merged across processes: :meth:`FeatureStats.reduce`), and the model evaluations they
    took; ``images``: also write them there as PNGs. The train stage's FID (``train.fid_every``) uses it too."""
    stats, nfe = FeatureStats(device=net.device), 0
    for indices in batches(ranks.share(cfg.num_samples), cfg.batch_size):
        x0, evaluations = net.sample(cfg, indices)
        nfe += int(evaluations.sum())
        u8 = to_uint8(x0)  # exactly what a PNG of the image would hold
        stats.add(batch_features(inception, torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(255.0)))
        if images is not None:
            for i, img in zip(indices, u8, strict=True):
                save_png(img, images / f"{i:06d}.png")
    return stats, nfe


def score_cell(params: Params, cfg: SampleConfig, path: Path) -> dict[str, Any]:
    """The cell's images (on every process) and their FID; on the main process the cell's record is written to
    ``path`` and logged as an MLflow child run of the training run; the record (``{}`` on the other ranks)."""
    ranks = Ranks.from_env()
    device = pick_device(cfg.device, ranks.local_rank)
    ranks.start(device)
    try:
        reference = reference_path(params)
        mu_ref, sigma_ref, ref_count = load_stats(reference)
        start = time.perf_counter()
        stats, _ = sample_and_score(params, cfg, ranks, device, path.with_suffix("") if params.sweep.images else None)
        stats.reduce()
        seconds = time.perf_counter() - start
    finally:
        ranks.finish()
    if not ranks.is_main:
        return {}
    warn_if_biased(stats.count)
    mu, sigma = stats.mean_and_covariance()
    settings = cfg.own_settings()
    cell = {
        **settings,
        "nfe": len(ddim_timesteps(params.diffusion.num_train_steps, cfg.steps, cfg.spacing)),  # quad drops repeats
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),  # an error if it is not finite
        "num_samples": stats.count,
        "reference_count": ref_count,
        "processes": ranks.world_size,
    }
    write_json(cell, path)  # the result; how long it took goes to MLflow only
    metrics = {**cell, "seconds": round(seconds, 1)}
    logged = {"sample": {**settings, "num_samples": cell["num_samples"]}, "sweep": True}
    model_sha256 = file_hash(Path(params.paths.train) / MODEL_FILE)
    parent = read_run_id(Path(params.paths.train))
    run_id = log_evaluation(
        params.tracking,
        parent,
        logged,
        metrics,
        None,
        model_sha256=model_sha256,
        reference=reference,
        clip_x0=cfg.clip_x0,
    )
    return {**metrics, "mlflow_run_id": run_id}
