"""The reference stage: Inception statistics of the prepared dataset, the "real" side of every FID."""

from __future__ import annotations

import time
from typing import Any

from tasks.common.config import Params
from tasks.common.dataset import PreparedDataset, dataset_dir
from tasks.common.devices import pick_device
from tasks.common.fid import UInt8Images, inception_features, reference_path, save_stats, statistics
from tasks.common.inception import load_inception


def run(params: Params) -> dict[str, Any]:
    """Inception statistics of the prepared training set (all of it, or ``evaluate.reference_count``)."""
    cfg = params.evaluate
    dataset = PreparedDataset(dataset_dir(params.data, params.paths))
    count = len(dataset) if cfg.reference_count is None else min(cfg.reference_count, len(dataset))
    model = load_inception(pick_device(cfg.device))
    start = time.perf_counter()
    feats = inception_features(UInt8Images(dataset.array[:count]), model, cfg.batch_size, cfg.num_workers)
    seconds = time.perf_counter() - start
    mu, sigma = statistics(feats)
    path = reference_path(params)
    save_stats(mu, sigma, path, count=count, dataset_sha256=dataset.manifest["sha256"])
    return {"reference": str(path), "count": count, "images_per_s": round(count / seconds, 2)}
