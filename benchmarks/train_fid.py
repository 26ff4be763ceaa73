"""What FID while training (``train.fid_every``) costs: the seconds of one training-time FID and of the training
steps between two, for the params' model (the demo by default). Prints a table, then JSON.

    python benchmarks/train_fid.py                                   # the demo: 500 images, DDIM 50 steps, eta 1
    python benchmarks/train_fid.py --set train.fid_samples=200 --steps 50

It trains ``--steps`` steps with the FID off (the loop's own images/s), then the same number again with one FID at
their end (``train.fid_every = --steps``; its seconds are the ``seconds`` column of ``train_fid.csv``: drawing
``train.fid_samples`` images with the sample section's sampler, their Inception features and the Frechet
distance), on shapes images of the config's size, in a throwaway folder. The reference statistics are of
``--reference-count`` images: their count changes the FID, not its cost.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import torch
from gpu import cpu_name  # benchmarks/ is on sys.path when a script of it runs

from tasks import reference, train
from tasks.common.config import load_params
from tasks.prepare import build_dataset


def measure(params_file: str, overrides: list[str], steps: int, reference_count: int, work: Path) -> dict:
    base = [
        f"paths.prepared={work}/prepared",
        f"paths.reference={work}/reference",
        f"paths.checkpoints={work}/ckpt",
        f"paths.train={work}/out",
        "tracking.enabled=false",
        "data.source=shapes",
        "data.count=512",
        "data.name=bench",
        f"evaluate.reference_count={reference_count}",
        "train.sample_every=0",
        "train.checkpoint_every=100000",
        "train.num_workers=0",
        f"train.log_every={steps}",
    ]
    params = load_params(params_file, [*base, *overrides, f"train.steps={steps}"])
    build_dataset(params.data, params.paths)
    reference.run(params)
    plain = train.run(params)  # steps 0 .. steps - 1, FID off
    fid_every = [*base, *overrides, f"train.steps={2 * steps}", f"train.fid_every={2 * steps}"]
    train.run(load_params(params_file, fid_every))  # resumes: steps .. 2 steps - 1, then one FID
    with open(work / "out" / train.FID_FILE, newline="") as f:
        (row,) = list(csv.DictReader(f))
    cfg = params.sample
    return {
        "model_ch": params.model.ch,
        "image_size": params.data.image_size,
        "batch_size": params.train.batch_size,
        "steps_per_s": round(plain["images_per_s"] / params.train.batch_size, 2),
        "fid_samples": int(row["num_samples"]),
        "sampler": f"{cfg.sampler}, {cfg.steps} steps, eta {cfg.eta}, batch {cfg.batch_size}",
        "seconds_per_fid": float(row["seconds"]),
        "fid": round(float(row["fid"]), 2),
    }


def table(result: dict) -> str:
    """Seconds added per 1,000 training steps, and the share of training time, for a few ``fid_every``."""
    train_s = 1000 / result["steps_per_s"]
    lines = [
        f"one FID of {result['fid_samples']} images ({result['sampler']}): {result['seconds_per_fid']:.1f} s; "
        f"1,000 training steps: {train_s:.0f} s",
        "| train.fid_every | seconds added per 1,000 steps | of training time |",
        "|---:|---:|---:|",
    ]
    for every in (500, 1000, 5000, 10_000, 50_000):
        added = result["seconds_per_fid"] * 1000 / every
        lines.append(f"| {every:,} | {added:.1f} | {100 * added / train_s:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=200, help="training steps timed, and between the two runs")
    parser.add_argument("--reference-count", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.params, args.overrides, args.steps, args.reference_count, Path(tmp))
    result |= {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name()}
    print(table(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
