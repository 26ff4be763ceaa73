"""The sweep stages: DDIM over a grid of steps x eta from ``model.pt``, each cell's FID, and the table.

Each cell (``ddim sweep-cell --steps S --eta E``, one DVC stage instance of the ``sweep`` matrix) draws
``sweep.num_samples`` images and computes their FID against the reference statistics in the same pass: each
batch is quantised to uint8 exactly as a PNG would store it and goes straight to Inception, whose features
are merged into running statistics (``tasks.fid.FeatureStats``), so no image is written unless
``sweep.images`` asks for them. Under ``torchrun`` the images are split by index and the statistics merged
across processes: the same images and the same FID as one process.

``ddim sweep-table`` gathers the cells of the current grid into ``table.csv`` and ``table.md`` (with DDIM's
Table 1 beside them where the cell is in it) and ``fid_vs_nfe.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models.diffusion import ddim_timesteps
from tasks.config import Params, SampleConfig
from tasks.devices import pick_device, set_precision
from tasks.distributed import Ranks, rank_main
from tasks.errors import UserError
from tasks.fid import FeatureStats, batch_features, frechet_distance, load_stats, reference_path, warn_if_biased
from tasks.files import atomic_path, markdown_table, write_json
from tasks.images import save_png, to_uint8
from tasks.inception import load_inception
from tasks.sampling import batches, load_for_sampling, sample_images
from tasks.tracking import log_evaluation, read_run_id

# DDIM (Song et al. 2021), Table 1: CIFAR-10 FID of 50,000 samples against the training set, quadratic spacing.
PAPER_FID = {
    0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    0.2: {10: 14.04, 20: 7.11, 50: 4.77, 100: 4.25, 1000: 4.09},
    0.5: {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    1.0: {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
}
COLUMNS = ["steps", "eta", "spacing", "nfe", "fid", "paper_fid", "difference", "num_samples"]


class SweepError(UserError):
    """A sweep cell or table cannot be made."""


def cell_name(steps: int, eta: float) -> str:
    """``steps50-eta0.5``: as DVC names the cell's output in dvc.yaml (``steps${item.steps}-eta${item.eta}``,
    which renders each value with ``str``), so an ``eta`` written ``0`` is ``eta0`` here too, not ``eta0.0``."""
    return f"steps{steps}-eta{eta}"


def number(text: str) -> int | float:
    """``--eta 0`` -> 0, ``--eta 0.5`` -> 0.5: the value as DVC wrote it into the command line, int or float."""
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else float(text)


def cell_path(params: Params, steps: int, eta: float) -> Path:
    return Path(params.paths.sweep) / "cells" / f"{cell_name(steps, eta)}.json"


def cell_config(params: Params, steps: int, eta: float) -> SampleConfig:
    """The sample section as this cell uses it: DDIM, the cell's steps and eta, the sweep's spacing and count."""
    s = params.sweep
    update = {"sampler": "ddim", "steps": steps, "eta": eta, "spacing": s.spacing}
    return params.sample.model_copy(update={**update, "num_samples": s.num_samples, "batch_size": s.batch_size})


def paper_fid(params: Params, steps: int, eta: float, spacing: str) -> float | None:
    """DDIM's Table 1 value for this cell, where the run is the one that table measured."""
    cifar = params.data.source == "cifar10" and params.data.split == "train" and params.data.count is None
    if not (cifar and spacing == "quad" and params.sweep.num_samples == 50_000):
        return None
    return PAPER_FID.get(float(eta), {}).get(steps)


def sample_and_score(
    params: Params, cfg: SampleConfig, ranks: Ranks, device: torch.device, images: Path | None
) -> FeatureStats:
    """Draw this process's share of the cell's images and merge their Inception features into statistics
    (``images``: write the images there as PNGs too)."""
    model, alphas_cumprod = load_for_sampling(params, device)
    amp_dtype, _ = set_precision(cfg.precision, device)
    inception, stats = load_inception(device), FeatureStats(device=device)
    for indices in batches(ranks.share(cfg.num_samples), cfg.batch_size):
        x0, _ = sample_images(model, alphas_cumprod, cfg, indices, amp_dtype)
        u8 = to_uint8(x0)  # exactly what a PNG of the image would hold
        stats.add(batch_features(inception, torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(255.0)))
        if images is not None:
            for i, img in zip(indices, u8, strict=True):
                save_png(img, images / f"{i:06d}.png")
    return stats


def run_cell(params: Params, steps: int, eta: float) -> dict[str, Any]:
    """One cell of the sweep: its FID (written to its JSON file and an MLflow child run) and how it was made."""
    cfg, ranks = cell_config(params, steps, eta), Ranks.from_env()
    device = pick_device(cfg.device, ranks.local_rank)
    ranks.start(device)
    try:
        mu_ref, sigma_ref, ref_count = load_stats(reference_path(params))
        start = time.perf_counter()
        images = cell_path(params, steps, eta).with_suffix("") if params.sweep.images else None
        stats = sample_and_score(params, cfg, ranks, device, images)
        stats.reduce()
        seconds = time.perf_counter() - start
    finally:
        ranks.finish()
    if not ranks.is_main:
        return {}
    warn_if_biased(stats.count)
    mu, sigma = stats.mean_and_covariance()
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)  # an error if it is not finite
    cell = {
        "steps": steps,
        "eta": eta,
        "spacing": cfg.spacing,
        "nfe": len(ddim_timesteps(params.diffusion.num_train_steps, steps, cfg.spacing)),  # quad drops repeats
        "fid": fid,
        "num_samples": stats.count,
        "reference_count": ref_count,
        "processes": ranks.world_size,
    }
    write_json(cell, cell_path(params, steps, eta))  # the result; how long it took goes to MLflow only
    sampling = {"sampler": "ddim", **{k: cell[k] for k in ("steps", "eta", "spacing", "num_samples")}}
    cell["seconds"] = round(seconds, 1)
    metrics = {**cell, "sampler": "ddim"}
    cell["mlflow_run_id"] = log_evaluation(
        params.tracking, read_run_id(Path(params.paths.train)), {"sample": sampling, "sweep": True}, metrics, None
    )
    return cell


# ---------------------------------------------------------------------------------------------------------
# The table and the plot
# ---------------------------------------------------------------------------------------------------------


def read_cells(params: Params) -> list[dict[str, Any]]:
    """The cells of the current grid, steps then eta (cells of an earlier, larger grid are left out)."""
    cells = []
    for steps in params.sweep.steps:
        for eta in params.sweep.eta:
            path = cell_path(params, steps, eta)
            if not path.is_file():
                raise SweepError(f"{path} not found: run `ddim sweep` (or ddim sweep-cell --steps {steps} --eta {eta})")
            cells.append(json.loads(path.read_text()))
    return cells


def plot_fid_vs_nfe(cells: list[dict[str, Any]], path: Path) -> None:
    """FID against model evaluations, one line per eta (log-scaled NFE), with the paper's where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for eta in sorted({c["eta"] for c in cells}):
        row = sorted((c for c in cells if c["eta"] == eta), key=lambda c: c["nfe"])
        line = ax.plot([c["nfe"] for c in row], [c["fid"] for c in row], marker="o", label=f"eta {eta}")[0]
        paper = [(c["nfe"], c["paper_fid"]) for c in row if c["paper_fid"] is not None]
        if paper:
            ax.plot(*zip(*paper, strict=True), ls="--", marker="x", color=line.get_color(), label=f"eta {eta} (paper)")
    ax.set(xscale="log", xlabel="model evaluations per image (NFE)", ylabel="FID", title="DDIM: FID against NFE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def table_rows(params: Params) -> list[dict[str, Any]]:
    """The current grid's cells, each with DDIM's Table 1 value and our difference from it where it applies."""
    rows = []
    for cell in read_cells(params):
        paper = paper_fid(params, cell["steps"], cell["eta"], cell["spacing"])
        rows.append({**cell, "paper_fid": paper, "difference": None if paper is None else cell["fid"] - paper})
    return rows


def write_table(params: Params) -> dict[str, Any]:
    """``table.csv``, ``table.md`` and ``fid_vs_nfe.png`` in ``paths.sweep`` from the current grid's cells."""
    import pandas as pd

    cells = table_rows(params)
    out = Path(params.paths.sweep)
    with atomic_path(out / "table.csv") as tmp:
        pd.DataFrame(cells, columns=COLUMNS).to_csv(tmp, index=False)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown_table(cells, COLUMNS))
    plot_fid_vs_nfe(cells, out / "fid_vs_nfe.png")
    return {"cells": cells, "table": str(out / "table.md"), "plot": str(out / "fid_vs_nfe.png")}


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point of one cell (``torchrun ... -m tasks.sweep --steps S --eta E --params FILE``)."""

    def cell_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, required=True)
        parser.add_argument("--eta", type=number, required=True)

    return rank_main("sweep-cell", lambda params, args: run_cell(params, args.steps, args.eta), argv, cell_arguments)


if __name__ == "__main__":
    sys.exit(main())
