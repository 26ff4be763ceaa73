"""The grid of the sweep: each cell's name and file, shared by the sweep's cells (``tasks/sweep.py`` for DDIM's
steps x eta, ``tasks/sweep_solver.py`` for the ODE solvers' solver x steps) and its table
(``tasks/sweep_table.py``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tasks.common.config import SOLVER_FORMS, SOLVER_SPEC, Params
from tasks.common.errors import UserError


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


def solver_settings(solver: str) -> dict[str, Any]:
    """``unipc-bh2-order2`` -> ``{"sampler": "unipc", "order": 2, "variant": "bh2"}``; ``dpm-solver++-order3``
    -> ``{"sampler": "dpm-solver++", "order": 3}``: the sample section's keys a solver sets."""
    match = re.fullmatch(SOLVER_SPEC, solver)
    if match is None:
        raise SweepError(f"solver {solver!r}: write {SOLVER_FORMS}")
    sampler, variant, order = match.groups()
    return {"sampler": sampler, "order": int(order), **({"variant": variant} if variant else {})}


def solver_cell_name(solver: str, steps: int) -> str:
    """``unipc-bh2-order2-steps10``: as dvc.yaml names the cell's output (``${item.solver}-steps${item.steps}``);
    a malformed solver is refused here, before any file is named after it."""
    solver_settings(solver)
    return f"{solver}-steps{steps}"


def solver_cell_path(params: Params, solver: str, steps: int) -> Path:
    return Path(params.paths.sweep) / "cells" / f"{solver_cell_name(solver, steps)}.json"
