"""``ddim import-model SOURCE``: released DDPM weights written as the pipeline's ``model.pt`` (the reading and
converting is in :mod:`tasks.common.pretrained`, which the train stage shares for ``model.pretrained``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common.config import TrackingConfig
from tasks.common.files import exclusive
from tasks.common.pretrained import read_source, write_imported


def run(
    source: str, out: Path, cache: Path, image_size: int | None = None, tracking: TrackingConfig | None = None
) -> dict[str, Any]:
    """Write ``source`` as the pipeline's ``model.pt`` at ``out`` (locked while written); return what was written.
    ``tracking``: where an MLflow ``models:/`` URI is looked up."""
    with exclusive(out, "`ddim import-model`"):
        imported = read_source(source, cache, image_size, tracking)
        write_imported(imported, out)
    return {"model": str(out), "model_config": imported.config.to_dict(), **imported.source}
