"""Time and peak memory of the prepare stage. Prints one JSON object.

    python benchmarks/prepare_speed.py [--shapes 10000] [--folder 1000] [--folder-size 1024] [--workers 0 2]

Cases: the shapes source at 32x32; a folder of JPEGs (CelebA-HQ-like: --folder-size px squares of smooth
random color fields) imported at 256 px, once per --workers value. Each case runs in a fresh subprocess
so its peak resident memory (ru_maxrss) is its own; the largest child process's peak is reported beside it
(decode workers, and a short-lived helper process that `import torch` starts: about 460 MiB here). Stage
code only: the Prefect engine's start-up (about 10 s per process here) is not included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CASE = r"""
import json, resource, sys, time
from tasks.common.config import DataConfig, PathsConfig
from tasks.prepare import build_dataset
data = DataConfig.model_validate_json(sys.argv[1])
paths = PathsConfig(raw=sys.argv[2] + "/raw", prepared=sys.argv[2] + "/prepared")
start = time.perf_counter()
manifest = build_dataset(data, paths)
seconds = time.perf_counter() - start
main_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"images": manifest["count"], "seconds": round(seconds, 2),
                  "images_per_second": round(manifest["count"] / seconds, 1),
                  "peak_rss_mib": round(main_kib / 1024, 1), "largest_child_peak_rss_mib": round(child_kib / 1024, 1)}))
"""


def run_case(data: dict, workdir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CASE, json.dumps(data), str(workdir)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_jpeg_folder(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(root / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=10_000)
    parser.add_argument("--folder", type=int, default=1_000)
    parser.add_argument("--folder-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["shapes_32px"] = run_case(
            {"name": "shapes", "source": "shapes", "count": args.shapes, "image_size": 32}, work
        )
        make_jpeg_folder(work / "jpegs", args.folder, args.folder_size)
        for workers in args.workers:
            data = {
                "name": f"folder{workers}",
                "source": "folder",
                "path": str(work / "jpegs"),
                "image_size": 256,
                "count": None,
                "workers": workers,
            }
            report[f"folder_{args.folder_size}px_to_256px_workers{workers}"] = run_case(data, work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
