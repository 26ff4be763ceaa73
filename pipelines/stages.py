"""The pipeline's stages, one row each: the one list that the `ddim` command line, the Prefect flows, the
torchrun launcher, ``make stages``, the layout test and the README read.

A row says what a newcomer asks of a stage: its name (the ``ddim`` command and the DVC stage), the module that
does its work (``tasks/<module>.py``, whose ``run(params, **args)`` is the entry of every stage), the output its
flow locks while it runs, the params section whose ``nproc_per_node`` starts it under ``torchrun``, and what
its flow shows in the Prefect UI. Adding a stage: its module, its config section, one row here, its entry in
``dvc.yaml``. Nothing here imports Prefect: the ranks under torchrun read this table too.

``python -m pipelines.stages`` prints the table (``make stages``; the README holds its output).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import (
    evaluate,
    interpolate,
    prepare,
    reconstruct,
    reference,
    sample,
    sweep,
    sweep_solver,
    sweep_table,
    train,
)
from tasks.common.config import SOLVER_FORMS, Params
from tasks.common.dataset import dataset_dir
from tasks.common.fid import reference_path
from tasks.common.grid import cell_name, number, solver_cell_name
from tasks.common.tracking import evaluation_name
from tasks.prepare import cifar10_download


@dataclass(frozen=True)
class Option:
    """A command-line option of a stage (``--steps 10``), handed to its ``run`` as a keyword argument."""

    name: str  # the keyword; the option is --name
    type: Callable[[str], Any]
    help: str


@dataclass(frozen=True)
class Artifact:
    """What a stage's flow shows in the Prefect UI (under its stage's ``artifact`` key): markdown or a table."""

    markdown: str | None = None
    table: list[dict[str, Any]] | None = None
    description: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str  # the `ddim` command, the Prefect flow, and the DVC stage (`dvc_name` where DVC's differs)
    run: Callable[..., dict[str, Any]]  # tasks.<module>.run(params, **options)
    help: str  # one line for `ddim --help` and the flow's description in the Prefect UI
    locks: Callable[..., Path]  # (params, **options) -> the output its flow holds an exclusive lock on
    task: str  # the Prefect task that does the work
    artifact: str  # the key of what its flow publishes in the Prefect UI ...
    publish: Callable[[dict[str, Any], Params], Artifact]  # ... made from (result, params)
    ranks: str | None = None  # the params section whose nproc_per_node (and nnodes) launches torchrun
    options: tuple[Option, ...] = ()
    progress: str | None = None  # the key of a progress artifact its run reports to (``progress=`` callback)
    fetch: Callable[[Params], tuple[str, Path, str] | None] | None = None  # (url, file, md5) to download first
    dvc_name: str | None = None

    @property
    def module(self) -> str:
        """The file that holds the stage's work."""
        return f"{self.run.__module__.replace('.', '/')}.py"


def summary(title: str, values: dict[str, Any]) -> str:
    """A two-column markdown table of ``values`` under ``# title``."""
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items()]
    return "\n".join([f"# {title}", "", "| | |", "|---|---|", *rows])


def _picked(result: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    return {k: result.get(k) for k in keys}


def _manifest(manifest: dict[str, Any], params: Params) -> Artifact:
    where = dataset_dir(params.data, params.paths)
    shape = f"{manifest['count']:,} x {manifest['height']}x{manifest['width']}x{manifest['channels']}"
    values = {
        "dataset": f"`{where}`",
        "source": manifest["source"] + (f" ({manifest['split']})" if manifest.get("split") else ""),
        "images": shape,
        "skipped": manifest["skipped"],
        "sha256": f"`{manifest['sha256']}`",
        "preview": f"`{where / 'preview.png'}`",
    }
    return Artifact(summary("Prepared dataset", values), description=f"prepare {params.data.name}")


TRAINING_KEYS = ["step", "resumed_from", "loss", "mse", "complexity_term", "images_per_s", "model", "mlflow_run_id"]
FID_KEYS = [
    "fid",
    "num_samples",
    "sampler",
    "steps",
    "eta",
    "spacing",
    "order",
    "variant",
    "base_step_size",
    "nfe",
    "reference_count",
]


def sweep_rows(cells: list[dict[str, Any]]) -> Artifact:
    rows = [{k: v for k, v in cell.items() if k in sweep_table.COLUMNS} for cell in cells]
    return Artifact(table=rows, description="Sweep: FID per sampler and steps")


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "prepare",
            prepare.run,
            "download, import or synthesize the dataset (the data section)",
            locks=lambda p: dataset_dir(p.data, p.paths),
            task="prepare-dataset",
            artifact="dataset-manifest",
            publish=_manifest,
            fetch=cifar10_download,
        ),
        Stage(
            "reference",
            reference.run,
            "Inception statistics of the prepared dataset, for FID (the evaluate section)",
            locks=reference_path,
            task="reference-statistics",
            artifact="reference-statistics",
            publish=lambda r, p: Artifact(summary("FID reference", r)),
        ),
        Stage(
            "train",
            train.run,
            "train the U-Net (the model, diffusion and train sections); resumes by default",
            locks=lambda p: Path(p.paths.train),
            task="train-model",
            artifact="training-summary",
            publish=lambda r, p: Artifact(summary("Training", _picked(r, TRAINING_KEYS)), description="train"),
            ranks="train",
            progress="training-progress",
        ),
        Stage(
            "sample",
            sample.run,
            "generate images from model.pt (the sample section); resumes by default",
            locks=lambda p: Path(p.paths.samples),
            task="sample-images",
            artifact="sampling-summary",
            publish=lambda r, p: Artifact(summary("Sampling", r), description="sample"),
            ranks="sample",
        ),
        Stage(
            "evaluate",
            evaluate.run,
            "FID of the samples against the reference; or, given two paths, FID between them",
            locks=lambda p: Path(p.paths.metrics),
            task="fid",
            artifact="fid",
            publish=lambda r, p: Artifact(table=[_picked(r, FID_KEYS)], description="FID of this sampling config"),
        ),
        Stage(
            "sweep-cell",
            sweep.run,
            "one cell of the sweep (a DVC stage of `ddim sweep`)",
            locks=lambda p, steps, eta: Path(p.paths.sweep) / f"cell-{cell_name(steps, eta)}",
            task="sweep-cell",
            artifact="sweep-cell",
            publish=lambda r, p: Artifact(summary(f"Sweep cell {cell_name(r['steps'], r['eta'])}", r)),
            ranks="sweep",
            options=(Option("steps", int, "DDIM steps"), Option("eta", number, "eta")),
            dvc_name="sweep",
        ),
        Stage(
            "sweep-solver-cell",
            sweep_solver.run,
            "one ODE solver cell of the sweep (a DVC stage of `ddim sweep`)",
            locks=lambda p, solver, steps: Path(p.paths.sweep) / f"cell-{solver_cell_name(solver, steps)}",
            task="sweep-solver-cell",
            artifact="sweep-solver-cell",
            publish=lambda r, p: Artifact(summary(f"Sweep cell {evaluation_name(r)}", r)),
            ranks="sweep",
            options=(
                Option("solver", str, SOLVER_FORMS),
                Option("steps", int, "steps"),
            ),
            dvc_name="sweep-solver",
        ),
        Stage(
            "sweep-table",
            sweep_table.run,
            "the sweep's table and FID-vs-NFE plot from its cells (a DVC stage)",
            locks=lambda p: Path(p.paths.sweep) / "table",
            task="sweep-table",
            artifact="sweep-table",
            publish=lambda r, p: sweep_rows(r["cells"]),
        ),
        Stage(
            "reconstruct",
            reconstruct.run,
            "encode images to DDIM latents and back: error per step count (latent section)",
            locks=lambda p: Path(p.paths.latent) / "reconstruct",
            task="reconstruct-images",
            artifact="reconstruction",
            publish=lambda r, p: Artifact(table=r["rows"], description="reconstruction error per S"),
        ),
        Stage(
            "interpolate",
            interpolate.run,
            "decode slerp and lerp paths between DDIM latents into a grid (latent section)",
            locks=lambda p: Path(p.paths.latent) / "interpolation",
            task="interpolate-latents",
            artifact="interpolation",
            publish=lambda r, p: Artifact(summary("Interpolation", {"grid": f"`{r['grid']}`"})),
        ),
    ]
}


def markdown() -> str:
    """The table as the README shows it."""
    lines = [
        "| `ddim` command | DVC stage | its work | torchrun when | Prefect task, artifact |",
        "|---|---|---|---|---|",
    ]
    for s in STAGES.values():
        ranks = f"`{s.ranks}.nproc_per_node` > 1" if s.ranks else "never"
        row = [f"`{s.name}`", f"`{s.dvc_name or s.name}`", f"`{s.module}`", ranks, f"`{s.task}`, `{s.artifact}`"]
        lines.append(f"| {' | '.join(row)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown() + "\n")
