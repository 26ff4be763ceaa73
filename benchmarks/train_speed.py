"""Training throughput (images/s) of the real training loop on the shapes data. Prints one JSON object.

    python benchmarks/train_speed.py              # the params.yaml model (the demo) and the 64-ch CIFAR-10 U-Net
    python benchmarks/train_speed.py --set train.precision=bf16 --steps 20

Each config trains for --steps steps (after --warmup-steps untimed ones, which absorb start-up) on shapes
images of the config's size, with the loop's own images/s over the timed window. Nothing is tracked: MLflow
writes to a throwaway store.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tasks import train
from tasks.common.config import load_params
from tasks.prepare import build_dataset

CIFAR_CH64 = [
    "model.ch=64",
    "model.ch_mult=[1,2,2,2]",
    "model.num_res_blocks=2",
    "model.attn_resolutions=[16]",
    "model.dropout=0.1",
    "data.image_size=32",
    "train.batch_size=128",
]


def measure(params_file: str, overrides: list[str], steps: int, warmup_steps: int, work: Path, tag: str) -> dict:
    base = [
        f"paths.prepared={work}/prepared",
        f"paths.checkpoints={work}/ckpt-{tag}",
        f"paths.train={work}/out-{tag}",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        "data.source=shapes",
        "data.count=512",
        "data.name=bench",
        "train.sample_every=0",
        "train.checkpoint_every=100000",
        "train.resume=never",
        "train.num_workers=0",
    ]
    params = load_params(params_file, base + overrides + [f"train.steps={warmup_steps + steps}"])
    build_dataset(params.data, params.paths)
    train.run(params, stop_after=warmup_steps)  # start-up, first-step allocations
    start = time.perf_counter()
    summary = train.run(
        load_params(
            params_file,
            base + overrides + ["train.resume=auto", f"train.steps={warmup_steps + steps}", f"train.log_every={steps}"],
        )
    )
    seconds = time.perf_counter() - start
    return {
        "model": {k: getattr(params.model, k) for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")},
        "image_size": params.data.image_size,
        "batch_size": params.train.batch_size,
        "precision": params.train.precision,
        "timed_steps": steps,
        "images_per_s": round(summary["images_per_s"], 1),
        "wall_seconds_incl_final_save_and_grid": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--skip-cifar", action="store_true")
    args = parser.parse_args()
    report = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        report["params_yaml"] = measure(args.params, args.overrides, args.steps, args.warmup_steps, Path(tmp), "p")
        if not args.skip_cifar:
            report["cifar10_ch64"] = measure(
                args.params, args.overrides + CIFAR_CH64, max(2, args.steps // 5), 1, Path(tmp), "c"
            )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
