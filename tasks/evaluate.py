"""The evaluate stage: the FID of the generated images against the reference statistics, the metrics file
(``dvc metrics show``) and an MLflow child run of the training run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tasks.common.config import SETTING_KEYS, Params
from tasks.common.devices import pick_device
from tasks.common.fid import (
    EvaluationError,
    ImageFiles,
    frechet_distance,
    inception_features,
    list_images,
    load_stats,
    reference_path,
    statistics,
    warn_if_biased,
)
from tasks.common.files import write_json
from tasks.common.inception import load_inception
from tasks.common.tracking import log_evaluation, read_run_id


def run(params: Params) -> dict[str, Any]:
    """FID of the generated images against the reference; writes the metrics file and an MLflow child run.

    What the images are (sampler, steps, eta, ...) comes from the samples folder's own record of how they were
    made, not from the params, so the metrics always describe the images they were computed from.
    """
    cfg = params.evaluate
    samples = Path(params.paths.samples)
    stats_file, config_file = samples / "sample_stats.json", samples / "config.json"
    if not stats_file.is_file() or not config_file.is_file():
        raise EvaluationError(f"{stats_file} not found: run `ddim sample` first")
    try:
        sample_stats, made = json.loads(stats_file.read_text()), json.loads(config_file.read_text())
        sampling, model_sha256, complete = made["sample"], made["model_sha256"], sample_stats["complete"]
    except (ValueError, KeyError, TypeError):
        raise EvaluationError(f"{samples} holds a damaged record of `ddim sample`: run `ddim sample` again") from None
    if not complete:
        raise EvaluationError(f"sampling in {samples} is incomplete: rerun `ddim sample` to finish it")
    reference = reference_path(params)
    mu_ref, sigma_ref, ref_count = load_stats(reference)
    files = list_images(samples / "images")
    warn_if_biased(len(files))
    model = load_inception(pick_device(cfg.device))
    start = time.perf_counter()
    feats = inception_features(ImageFiles(files), model, cfg.batch_size, cfg.num_workers)
    seconds = time.perf_counter() - start
    mu, sigma = statistics(feats)
    metrics = {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "num_samples": len(files),
        **{k: sample_stats.get(k) for k in SETTING_KEYS},  # older records lack order and variant
        "nfe": sample_stats["nfe_mean"],
        "reference_count": ref_count,
        "precision": sample_stats["precision"],
        "device": sample_stats["device"],
    }
    write_json(metrics, Path(params.paths.metrics))
    parent = read_run_id(Path(params.paths.train))
    run_id = log_evaluation(
        params.tracking,
        parent,
        {"sample": sampling},
        metrics,
        samples / "grid.png",
        model_sha256=model_sha256,  # the model that drew the images: its logged model gets the FID
        reference=reference,
        clip_x0=sampling.get("clip_x0", True),  # older records lack it; the default was on
    )
    return {**metrics, "mlflow_run_id": run_id, "inception_images_per_s": round(len(files) / seconds, 2)}
