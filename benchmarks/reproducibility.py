"""What is bit-identical and what is not: training and sampling repeated with the same and another CPU thread
count, on this machine. JSON.

    python benchmarks/reproducibility.py [--params params.yaml] [--steps 200] [--images 64] [--set key=value ...]

Prepares the params' dataset into a temporary folder, trains ``--steps`` steps three times (2 threads, 2
threads again, 1 thread) and compares the EMA weights with the first run's; then samples ``--images`` images
from the first model with 2, 2 and 1 threads and compares the pixels. Nothing outside the temporary folder
is written (MLflow goes to a database there too).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tasks import sample, train
from tasks.common.checkpoint import load_model
from tasks.common.config import load_params
from tasks.common.images import read_png
from tasks.prepare import build_dataset
from tasks.sample import image_path

THREADS = (2, 2, 1)


def ema_weights(model_file: Path) -> dict[str, torch.Tensor]:
    return load_model(model_file)[1]["ema"]


def weights_against(a: dict[str, torch.Tensor], other: Path) -> dict[str, float | bool]:
    b = ema_weights(other)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(a[k].float().abs().max()) for k in a)
    return {"identical": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": diff, "max_abs_weight": scale}


def pixels(folder: Path, count: int) -> np.ndarray:
    return np.stack([read_png(image_path(folder, i)) for i in range(count)]).astype(int)


def main(argv: list[str] | None = None) -> dict[str, list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    threads_before = torch.get_num_threads()
    try:
        report = measure(args)
    finally:
        torch.set_num_threads(threads_before)
    print(json.dumps(report, indent=2))
    return report


def measure(args: argparse.Namespace) -> dict[str, list]:
    report: dict[str, list] = {"train": [], "sample": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = [
            *args.overrides,
            f"paths.prepared={root / 'prepared'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"train.steps={args.steps}",
            "train.sample_every=0",
            f"sample.num_samples={args.images}",
        ]
        params = load_params(args.params, base)
        build_dataset(params.data, params.paths)
        first = None
        for i, threads in enumerate(THREADS):
            torch.set_num_threads(threads)
            run = [*base, f"paths.train={root / f'train{i}'}", f"paths.checkpoints={root / f'ckpt{i}'}"]
            summary = train.run(load_params(args.params, run))
            if first is None:  # the run the others are compared with
                first = ema_weights(root / "train0" / "model.pt")
            row = {"threads": threads, "weights_sha256": summary["weights_sha256"][:16]}
            report["train"].append(row | weights_against(first, root / f"train{i}" / "model.pt"))
        for i, threads in enumerate(THREADS):
            torch.set_num_threads(threads)
            out = root / f"samples{i}"
            sample.run(load_params(args.params, [*base, f"paths.train={root / 'train0'}", f"paths.samples={out}"]))
            diff = np.abs(pixels(out, args.images) - pixels(root / "samples0", args.images))
            report["sample"].append(
                {"threads": threads, "identical": not diff.any(), "pixels_differing": float((diff > 0).mean())}
                | {"max_grey_levels": int(diff.max())}
            )
    return report


if __name__ == "__main__":
    main()
