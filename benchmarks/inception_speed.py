"""Inception (FID feature) throughput on this machine, before and after our optimisations. Prints JSON.

    python benchmarks/inception_speed.py [--images 200]

"pytorch_fid_default": pytorch-fid's own `get_activations` as its CLI runs it (batch 50, torch.no_grad,
NCHW). "ours": `tasks.common.fid.inception_features` (batch 200, torch.inference_mode, channels_last). Both
read the same PNG files (shapes at 32 px) and must give the same features.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_fid.fid_score import get_activations

from tasks.common.fid import ImageFiles, inception_features, list_images
from tasks.common.inception import load_inception
from tasks.prepare import shape_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.images):
            Image.fromarray(shape_image(32, 0, i)).save(Path(tmp) / f"{i:06d}.png")
        files = list_images(Path(tmp))
        model = load_inception("cpu")
        start = time.perf_counter()
        baseline = get_activations(
            [str(f) for f in files], model, batch_size=50, dims=2048, device="cpu", num_workers=2
        )
        before = time.perf_counter() - start
        start = time.perf_counter()
        ours = inception_features(ImageFiles(files), load_inception("cpu"), batch_size=200, num_workers=2)
        after = time.perf_counter() - start
    print(
        json.dumps(
            {
                "images": args.images,
                "threads": torch.get_num_threads(),
                "pytorch_fid_default_images_per_s": round(args.images / before, 2),
                "ours_images_per_s": round(args.images / after, 2),
                "max_abs_feature_diff": float(np.abs(baseline - ours).max()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
