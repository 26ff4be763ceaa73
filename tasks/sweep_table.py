"""The sweep-table stage: the current grid's cells (DDIM's, ``tasks/sweep.py``, and the ODE solvers',
``tasks/sweep_solver.py``) gathered into ``table.csv`` and ``table.md``, with DDIM's Table 1 beside them where the
cell is in it, and ``fid_vs_nfe.png``: one curve per sampler (per eta for DDIM).

No paper reports a solver cell in the setting of DDIM's table: DPM-Solver's CIFAR-10 figures on DDPM's model
(Lu et al. 2022, e.g. 4.65 at 12 evaluations) are its singlestep solver with its own timesteps, not DPM-Solver++
multistep on quad spacing, and UniPC's CIFAR-10 figures are of another model. Those cells' paper column stays
empty rather than compare unlike settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common.config import Params
from tasks.common.files import atomic_path, markdown_table
from tasks.common.grid import SweepError, cell_path, solver_cell_path

# DDIM (Song et al. 2021), Table 1: CIFAR-10 FID of 50,000 samples against the training set, quadratic spacing.
PAPER_FID = {
    0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    0.2: {10: 14.04, 20: 7.11, 50: 4.77, 100: 4.25, 1000: 4.09},
    0.5: {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    1.0: {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
}
COLUMNS = [
    "sampler",
    "steps",
    "eta",
    "order",
    "variant",
    "spacing",
    "nfe",
    "fid",
    "paper_fid",
    "difference",
    "num_samples",
]


def paper_fid(params: Params, steps: int, eta: float, spacing: str) -> float | None:
    """DDIM's Table 1 value for this cell, where the run is the one that table measured."""
    cifar = params.data.source == "cifar10" and params.data.split == "train" and params.data.count is None
    if not (cifar and spacing == "quad" and params.sweep.num_samples == 50_000):
        return None
    return PAPER_FID.get(float(eta), {}).get(steps)


def read_cell(path: Path, command: str) -> dict[str, Any]:
    if not path.is_file():
        raise SweepError(f"{path} not found: run `ddim sweep` (or {command})")
    return {"sampler": "ddim", **json.loads(path.read_text())}  # cells of before the solvers name no sampler


def read_cells(params: Params) -> list[dict[str, Any]]:
    """The cells of the current grid: DDIM's, steps then eta, then each solver's by steps (cells of an earlier,
    larger grid are left out)."""
    s = params.sweep
    cells = [
        read_cell(cell_path(params, steps, eta), f"ddim sweep-cell --steps {steps} --eta {eta}")
        for steps in s.steps
        for eta in s.eta
    ]
    for solver in s.solvers:
        for steps in s.steps:
            command = f"ddim sweep-solver-cell --solver {solver} --steps {steps}"
            cells.append(read_cell(solver_cell_path(params, solver, steps), command))
    return cells


def curve(cell: dict[str, Any]) -> str:
    """The plot's name for the cell's sampler: ``DDIM, eta 0.0``, ``DPM-Solver++ 2M``, ``UniPC bh2, order 2``."""
    if cell["sampler"] == "ddim":
        return f"DDIM, eta {cell['eta']}"
    if cell["sampler"] == "dpm-solver++":
        return f"DPM-Solver++ {cell['order']}M"
    return f"UniPC {cell['variant']}, order {cell['order']}"


def plot_fid_vs_nfe(cells: list[dict[str, Any]], path: Path) -> None:
    """FID against model evaluations, one line per sampler (log-scaled NFE), with the paper's where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in dict.fromkeys(curve(c) for c in cells):  # in the table's order
        row = sorted((c for c in cells if curve(c) == name), key=lambda c: c["nfe"])
        line = ax.plot([c["nfe"] for c in row], [c["fid"] for c in row], marker="o", label=name)[0]
        paper = [(c["nfe"], c["paper_fid"]) for c in row if c["paper_fid"] is not None]
        if paper:
            ax.plot(*zip(*paper, strict=True), ls="--", marker="x", color=line.get_color(), label=f"{name} (paper)")
    ax.set(xscale="log", xlabel="model evaluations per image (NFE)", ylabel="FID", title="FID against NFE")
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
        ddim = cell["sampler"] == "ddim"
        paper = paper_fid(params, cell["steps"], cell["eta"], cell["spacing"]) if ddim else None
        rows.append({**cell, "paper_fid": paper, "difference": None if paper is None else cell["fid"] - paper})
    return rows


def run(params: Params) -> dict[str, Any]:
    """``table.csv``, ``table.md`` and ``fid_vs_nfe.png`` in ``paths.sweep`` from the current grid's cells."""
    import pandas as pd

    cells = table_rows(params)
    out = Path(params.paths.sweep)
    with atomic_path(out / "table.csv") as tmp:
        pd.DataFrame(cells, columns=COLUMNS).astype({"order": "Int64"}).to_csv(tmp, index=False)  # not 2.0
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown_table(cells, COLUMNS))
    plot_fid_vs_nfe(cells, out / "fid_vs_nfe.png")
    return {"cells": cells, "table": str(out / "table.md"), "plot": str(out / "fid_vs_nfe.png")}
