"""The reconstruct stage: DDIM's section 5.4. Encode real images to their latent x_T with the eta = 0 DDIM ODE
run forwards, decode them back with DDIM, and measure the per-dimension squared error (images in [-1, 1], the
paper's units) for each step count S of ``latent.steps``.

Each image is encoded and decoded on its own (the network treats a batch's images independently), so its
error does not depend on the batch size (beyond float rounding: convolutions pick other kernels for other
batch sizes; 1e-4 relative in the tests). Output in ``paths.latent``: ``reconstruct.csv`` (also the ``dvc
plots`` curve of error against S), ``reconstruct.md`` (with DDIM's Table 2 beside it for CIFAR-10's test
set), ``reconstruct.json`` (DVC metrics) and ``reconstruct.png`` (originals in the top row, then one row of
reconstructions per S); an MLflow child run of the training run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.diffusion import ddim_reconstruct, ddim_timesteps
from tasks.common.config import Params
from tasks.common.dataset import first_images
from tasks.common.devices import pick_device
from tasks.common.errors import UserError
from tasks.common.files import atomic_path, markdown_table, write_json
from tasks.common.images import from_uint8, make_grid, save_png, to_uint8
from tasks.common.inference import InferenceModel, load_inference
from tasks.common.tracking import log_child_run, read_run_id

# DDIM (Song et al. 2021), Table 2: reconstruction error per dimension on CIFAR-10's test set, as printed.
PAPER_MSE = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}
COLUMNS = ["steps", "spacing", "nfe", "mse", "mse_max", "paper_mse", "num_images"]  # seconds: MLflow only
GRID_IMAGES = 8


class ReconstructionError(UserError):
    """The images cannot be encoded and decoded."""


def reconstruct(
    net: InferenceModel, images: np.ndarray, timesteps: torch.Tensor, clip_x0: bool, batch_size: int
) -> tuple[np.ndarray, torch.Tensor]:
    """Each image's per-dimension squared error ``[N]`` (float64) and the first reconstructions (CPU)."""

    def encode_decode(x_0: torch.Tensor) -> torch.Tensor:
        return ddim_reconstruct(net.model, x_0, net.alphas_cumprod, timesteps, clip_x0)[0]

    def broken(indices: list[int]) -> ReconstructionError:
        where = f"images {indices[0]}..{indices[-1]}"
        return ReconstructionError(f"{where} decoded to NaN or infinity: try sample.precision=fp32")

    errors, kept = [], []
    for x_0, x_rec in net.in_batches(encode_decode, from_uint8(images), batch_size, broken):
        errors.append(((x_rec.double() - x_0.double()) ** 2).mean(dim=(1, 2, 3)).cpu().numpy())
        kept.append(x_rec[: max(0, GRID_IMAGES - sum(len(k) for k in kept))].cpu())
    return np.concatenate(errors), torch.cat(kept)


def paper_mse(manifest: dict[str, Any], steps: int) -> float | None:
    """DDIM's Table 2 value where it applies: CIFAR-10's test set (all of it, or the first N)."""
    applies = manifest.get("source") == "cifar10" and manifest.get("split") == "test"
    return PAPER_MSE.get(steps) if applies else None


def run(params: Params) -> dict[str, Any]:
    """Reconstruction error for each S of ``latent.steps``; writes the table, plot data, grid and metrics."""
    cfg = params.latent
    root = Path(params.paths.prepared) / (cfg.dataset or params.data.name)
    images, manifest = first_images(root, cfg.num_images, params.data.image_size)
    net = load_inference(params, pick_device(params.sample.device))
    rows, grid = [], [images[:GRID_IMAGES]]
    for steps in cfg.steps:
        timesteps = ddim_timesteps(params.diffusion.num_train_steps, steps, cfg.spacing)
        start = time.perf_counter()
        errors, shown = reconstruct(net, images, timesteps, cfg.clip_x0, cfg.batch_size)
        rows.append(
            {
                "steps": steps,
                "spacing": cfg.spacing,
                "nfe": 2 * len(timesteps),  # encoding and decoding
                "mse": float(errors.mean()),
                "mse_max": float(errors.max()),
                "paper_mse": paper_mse(manifest, steps),
                "num_images": len(errors),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
        grid.append(to_uint8(shown))
    run = {"device": str(net.device), "precision": net.precision}
    return write_outputs(params, rows, np.concatenate(grid), manifest, run)


def write_outputs(
    params: Params, rows: list[dict[str, Any]], grid: np.ndarray, manifest: dict[str, Any], run: dict[str, str]
) -> dict[str, Any]:
    """The table (csv, markdown), the DVC metrics, the grid and the MLflow child run. The run's seconds go to
    MLflow only: the files DVC tracks hold results, the same on every rerun."""
    import pandas as pd

    out = Path(params.paths.latent)
    with atomic_path(out / "reconstruct.csv") as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)
    with atomic_path(out / "reconstruct.md") as tmp:
        tmp.write_text(markdown_table(rows, COLUMNS, ".4g"))
    save_png(make_grid(grid, nrow=len(grid) // (len(rows) + 1)), out / "reconstruct.png")  # a row per S
    metrics = {"dataset": manifest["name"], "mse": {str(r["steps"]): r["mse"] for r in rows}, **run}
    write_json(metrics, out / "reconstruct.json")
    flat = {f"mse_S{r['steps']}": r["mse"] for r in rows} | {f"seconds_S{r['steps']}": r["seconds"] for r in rows}
    run_id = log_child_run(
        params.tracking,
        read_run_id(Path(params.paths.train)),
        f"reconstruct-{params.latent.spacing}-{manifest['name']}",
        {"latent": params.latent.model_dump(mode="json", include=set(params.latent.result_keys()))},
        flat,
        [out / "reconstruct.png", out / "reconstruct.md"],
        {"stage": "reconstruct", **run},
    )
    return {"rows": rows, "table": str(out / "reconstruct.md"), "grid": str(out / "reconstruct.png"), "run": run_id}
