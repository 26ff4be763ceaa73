"""The sweep-solver stage: one cell of the ODE solvers' grid of solver x steps from ``model.pt``, and its FID.

Each cell (``ddim sweep-solver-cell --solver unipc-bh2-order2 --steps S``, one DVC stage instance of the
``sweep-solver`` matrix) draws ``sweep.num_samples`` images with DPM-Solver++ or UniPC (``models/solvers.py``)
at the order (and UniPC variant) its solver names, with the sweep's spacing, and scores them as DDIM's cells are
(``tasks.common.scoring``). A solver evaluates the network once per step: a cell's NFE is its step count (after
quad spacing drops repeated timesteps), DDIM's at the same steps.
"""

from __future__ import annotations

from typing import Any

from tasks.common.config import Params
from tasks.common.grid import solver_cell_path, solver_settings
from tasks.common.scoring import cell_config, score_cell


def run(params: Params, solver: str, steps: int) -> dict[str, Any]:
    """One solver cell: its FID (written to its JSON file and an MLflow child run) and how it was made."""
    cfg = cell_config(params, **solver_settings(solver), steps=steps)
    return score_cell(params, cfg, solver_cell_path(params, solver, steps))
