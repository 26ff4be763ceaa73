"""Sampling throughput of a trained model.pt with the sample stage's own loop (PNG writes included). JSON.

    python benchmarks/sample_speed.py [--params params.yaml] [--count 200] [--set key=value ...]

Runs DDIM (the params' steps and spacing) and the adaptive sampler on the same model, each into a temporary
folder, and reports model evaluations per image and images/s. Needs `results/train/model.pt` (or the params'
paths.train) from `ddim train`.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from tasks import sample
from tasks.common.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    report = {}
    keys = ("steps", "nfe_mean", "nfe_min", "nfe_max", "wall_seconds", "images_per_s")
    for sampler in ("ddim", "adaptive"):
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [*args.overrides, f"sample.num_samples={args.count}", f"sample.sampler={sampler}"]
            stats = sample.run(load_params(args.params, [*overrides, f"paths.samples={tmp}"]))
        report[sampler] = {k: stats[k] for k in keys}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
