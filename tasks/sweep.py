"""The sweep stage: one cell of DDIM's grid of steps x eta from ``model.pt``, and its FID.

Each cell (``ddim sweep-cell --steps S --eta E``, one DVC stage instance of the ``sweep`` matrix) draws
``sweep.num_samples`` images with DDIM and scores them in the same pass (``tasks.common.scoring``: no image is
written unless ``sweep.images`` asks; under ``torchrun`` the same images and FID as one process). The ODE
solvers' cells are ``tasks/sweep_solver.py``; the table of both is ``tasks/sweep_table.py``.
"""

from __future__ import annotations

from typing import Any

from tasks.common.config import Params
from tasks.common.grid import cell_path
from tasks.common.scoring import cell_config, score_cell


def run(params: Params, steps: int, eta: float) -> dict[str, Any]:
    """One cell of the sweep: its FID (written to its JSON file and an MLflow child run) and how it was made."""
    cfg = cell_config(params, sampler="ddim", steps=steps, eta=eta)
    return score_cell(params, cfg, cell_path(params, steps, eta))
