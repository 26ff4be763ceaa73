"""The grid of the sweep: each cell's name and file, shared by the sweep's cells (``tasks/sweep.py``) and its
table (``tasks/sweep_table.py``)."""

from __future__ import annotations

import re
from pathlib import Path

from tasks.common.config import Params
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
