"""Three FIDs against the shapes reference statistics, on equal image counts. Prints JSON.

    python benchmarks/fid_floor_ceiling.py [--count 1000] [--params params.yaml]

1. samples of the params.yaml model (prepare, train and sample run first if their outputs are missing);
2. shapes images made with another seed: the floor, what a perfect model of the data would score;
3. Gaussian noise images: the ceiling.
The reference is the prepared dataset's statistics (`ddim reference`, all of its images). Runs in the current
directory's pipeline folders, like the `ddim` stages; the floor/ceiling images go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tasks import reference, sample, train
from tasks.common.config import load_params
from tasks.common.fid import (
    ImageFiles,
    frechet_distance,
    inception_features,
    list_images,
    load_stats,
    reference_path,
    statistics,
)
from tasks.common.inception import load_inception
from tasks.prepare import build_dataset, shape_image


def fid_of(folder: Path, ref: tuple[np.ndarray, np.ndarray], model) -> float:
    mu, sigma = statistics(inception_features(ImageFiles(list_images(folder)), model, batch_size=200, num_workers=2))
    return round(frechet_distance(mu, sigma, *ref), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    params = load_params(args.params, [f"sample.num_samples={args.count}"])
    timings = {}
    start = time.perf_counter()
    if not (Path(params.paths.prepared) / params.data.name / "manifest.json").is_file():
        build_dataset(params.data, params.paths)
    if not (Path(params.paths.train) / "model.pt").is_file():
        train.run(params)
    timings["prepare_train_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    sample_stats = sample.run(params)
    timings["sample_s"] = round(time.perf_counter() - start, 1)
    if not reference_path(params).is_file():
        reference.run(params)
    mu_ref, sigma_ref, ref_count = load_stats(reference_path(params))
    model = load_inception("cpu")
    size = params.data.image_size
    report = {"count": args.count, "reference_count": ref_count, "sampling": sample_stats, "timings": timings}
    report["fid_model_samples"] = fid_of(Path(params.paths.samples) / "images", (mu_ref, sigma_ref), model)
    with tempfile.TemporaryDirectory() as tmp:
        floor, ceiling = Path(tmp) / "floor", Path(tmp) / "ceiling"
        floor.mkdir()
        ceiling.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.count):
            Image.fromarray(shape_image(size, params.data.seed + 1, i)).save(floor / f"{i:06d}.png")
            noise = np.clip(rng.normal(127.5, 127.5 / 2, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noise).save(ceiling / f"{i:06d}.png")
        report["fid_shapes_other_seed_floor"] = fid_of(floor, (mu_ref, sigma_ref), model)
        report["fid_gaussian_noise_ceiling"] = fid_of(ceiling, (mu_ref, sigma_ref), model)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
