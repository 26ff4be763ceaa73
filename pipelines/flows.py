"""Prefect flows: one per pipeline stage. Each flow only orchestrates; the work is in ``tasks/``.

A flow takes the params file and ``--set`` style overrides as its parameters, so a deployment or a UI run
can change any param the way the CLI does. Tasks that write files opt out of Prefect's result cache
(``NO_CACHE``): DVC decides what is up to date. Each stage's flow holds an exclusive lock on its output while
it runs (``tasks.files.exclusive``): a second run on the same output stops at once, naming the first.

A Prefect API that stops answering during a stage does not stop the work: the training progress is sent from
a background thread (:class:`ProgressArtifact`), and each stage's task hands its result to :data:`FINISHED`
as soon as its outputs are complete, where the CLI finds it when Prefect fails afterwards (the task's end
state, the artifacts) and ends the command with a warning and exit status 0.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from tasks.config import CIFAR10_URL, DataConfig, Params, TrainConfig, load_params
from tasks.data import CIFAR10_MD5, cifar10_archive_path, download, prepare_dataset
from tasks.dataset import dataset_dir
from tasks.errors import UserError
from tasks.evaluate import evaluate_samples
from tasks.fid import reference_path
from tasks.files import exclusive
from tasks.interpolate import run_interpolate
from tasks.reconstruct import run_reconstruct
from tasks.reference import compute_reference
from tasks.sample import run_sampling
from tasks.sweep import COLUMNS as SWEEP_COLUMNS
from tasks.sweep import cell_name, run_cell, table_rows, write_table
from tasks.tracking import read_run_id
from tasks.train import train


class PipelineError(UserError):
    """A pipeline command failed."""


FINISHED: dict[str, Any] = {}  # "result": the result of the stage whose outputs are complete (one per command)


def stage_task(name: str) -> Callable[[Callable[..., Any]], Any]:
    """``@task(name=name)`` without Prefect's result cache (DVC decides what is up to date), whose return value is
    also kept in :data:`FINISHED`: the stage's outputs are complete, whatever Prefect can still record."""

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def remembered(*args: Any, **kwargs: Any) -> Any:
            FINISHED["result"] = result = fn(*args, **kwargs)
            return result

        return task(name=name, cache_policy=NO_CACHE)(remembered)

    return decorate


class ProgressArtifact:
    """A Prefect progress artifact updated by a background thread with the newest value only: an API that stops
    answering (each call then waits out the client's retries) never holds up the caller."""

    def __init__(self, key: str, description: str) -> None:
        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.newest: float | None = None
        self.changed, self.closed = threading.Condition(), False
        threading.Thread(target=self._send, name=f"progress-{key}", daemon=True).start()

    def update(self, percent: float) -> None:
        with self.changed:
            self.newest = percent
            self.changed.notify()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify()

    def _send(self) -> None:
        while True:
            with self.changed:
                while self.newest is None and not self.closed:
                    self.changed.wait()
                if self.newest is None:  # closed, and the last value sent
                    return
                percent, self.newest = self.newest, None
            try:
                update_progress_artifact(self.id, percent)
            except Exception:  # the API is away: this value is dropped, the next one is tried
                continue


def run_name() -> str:
    """A flow run's name in the Prefect UI: the flow, the dataset, and the values its parameters set, e.g.
    ``sample-shapes16 sample.steps=20`` or ``sweep-cell-cifar10 steps=50 eta=0.0``."""
    from prefect.runtime import flow_run

    args = dict(flow_run.parameters)
    overrides = list(args.get("overrides") or [])
    try:
        name = f"{flow_run.flow_name}-{load_params(args.get('params_file', 'params.yaml'), overrides).data.name}"
    except UserError:  # bad params: the flow itself reports them
        name = flow_run.flow_name
    extra = [f"{k}={args[k]}" for k in ("steps", "eta") if k in args] + overrides + list(args.get("targets") or [])
    return " ".join([name, *extra])


def _retryable(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry only what can succeed on retry (a network hiccup); a checksum mismatch or a 404 fails at once."""
    return bool(getattr(state.data, "retryable", False))


@task(
    name="download-cifar10",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=_retryable,
)
def download_task(url: str, dest: Path, md5: str = CIFAR10_MD5) -> Path:
    return download(url, dest, md5)


@stage_task("prepare-dataset")
def prepare_task(data: DataConfig, paths: Any, archive: Path | None) -> dict[str, Any]:
    return prepare_dataset(data, paths, archive=archive)


def manifest_markdown(manifest: dict[str, Any], where: Path) -> str:
    return _table(
        "Prepared dataset",
        {
            "dataset": f"`{where}`",
            "source": manifest["source"] + (f" ({manifest['split']})" if manifest.get("split") else ""),
            "images": f"{manifest['count']:,} x {manifest['height']}x{manifest['width']}x{manifest['channels']}",
            "skipped": manifest["skipped"],
            "sha256": f"`{manifest['sha256']}`",
            "preview": f"`{where / 'preview.png'}`",
        },
    )


@flow(
    name="prepare",
    description="Download, import or synthesize the dataset into data/prepared/<name>.",
    flow_run_name=run_name,
)
def prepare_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    data, paths = params.data, params.paths
    with exclusive(dataset_dir(data, paths), "`ddim prepare`"):
        archive = None
        if data.source == "cifar10" and data.archive is None:
            archive = download_task(data.url or CIFAR10_URL, cifar10_archive_path(paths))
        manifest = prepare_task(data, paths, archive)
    where = Path(paths.prepared) / data.name
    create_markdown_artifact(
        key="dataset-manifest", markdown=manifest_markdown(manifest, where), description=f"prepare {data.name}"
    )
    return manifest


def torchrun_launcher(nproc: int, train: TrainConfig | None = None) -> list[str]:
    """``torchrun`` for ``nproc`` processes on this machine; with ``train.nnodes > 1``, this machine's share of
    a job on several, which meet through the c10d rendezvous at ``train.rdzv_endpoint``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if train is None or train.nnodes == 1:
        return [*launcher, "--standalone", f"--max-restarts={train.max_restarts if train else 0}"]
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={train.rdzv_endpoint}", f"--rdzv-id={train.rdzv_id}"]
    return [*launcher, f"--nnodes={train.nnodes}", *rendezvous, f"--max-restarts={train.max_restarts}"]


def run_ranks(module: str, params_file: str, overrides: list[str], launcher: list[str], args: list[str] = ()) -> Any:
    """Run ``python -m module`` under ``launcher`` (torchrun), its output streamed into the flow's log; return
    rank 0's result (its last output line, JSON; ``{}`` on the other machines of a multi-node job, where rank 0
    does not run). A failure raises the ranks' own error line."""
    logger = get_run_logger()
    sets = [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.Popen(
        [*launcher, "-m", module, *args, "--params", params_file, *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last_line, error = "", None
    assert proc.stdout is not None
    for line in proc.stdout:
        logger.info(line.rstrip())
        last_line = line.strip() or last_line
        error = line.split(": error: ", 1)[1].strip() if line.startswith("ddim ") and ": error: " in line else error
    if proc.wait() != 0:
        raise PipelineError(error or f"{' '.join(launcher[2:])} failed (exit {proc.returncode}): see the log")
    return json.loads(last_line) if last_line.startswith("{") else {}


@stage_task("train-model")
def train_task(params_file: str, overrides: list[str]) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    if params.train.nproc_per_node > 1 or params.train.nnodes > 1:  # one rank per process under torchrun
        launcher = torchrun_launcher(params.train.nproc_per_node, params.train)
        return run_ranks("tasks.train", params_file, overrides, launcher)
    progress = ProgressArtifact("training-progress", "training steps done (%)")
    try:
        return train(params, progress=lambda step, total, _metrics: progress.update(100.0 * step / total))
    finally:
        progress.close()


@flow(
    name="train",
    description="Train the U-Net with the complexity-weighted loss; EMA weights to model.pt.",
    flow_run_name=run_name,
)
def train_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    with exclusive(load_params(params_file, overrides).paths.train, "`ddim train`"):
        summary = train_task(params_file, list(overrides or []))
    keys = ["step", "resumed_from", "loss", "mse", "complexity_term", "images_per_s", "model", "mlflow_run_id"]
    create_markdown_artifact(
        key="training-summary", markdown=_table("Training", {k: summary.get(k) for k in keys}), description="train"
    )
    return summary


@stage_task("sample-images")
def sample_task(params_file: str, overrides: list[str]) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    if params.sample.nproc_per_node > 1:
        return run_ranks("tasks.sample", params_file, overrides, torchrun_launcher(params.sample.nproc_per_node))
    return run_sampling(params)


@flow(
    name="sample",
    description="Generate images from model.pt with DDIM or the adaptive sampler.",
    flow_run_name=run_name,
)
def sample_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    with exclusive(load_params(params_file, overrides).paths.samples, "`ddim sample`"):
        stats = sample_task(params_file, list(overrides or []))
    create_markdown_artifact(key="sampling-summary", markdown=_table("Sampling", stats), description="sample")
    return stats


@stage_task("reference-statistics")
def reference_task(params: Params) -> dict[str, Any]:
    return compute_reference(params)


@flow(name="reference", description="Inception statistics of the prepared dataset, for FID.", flow_run_name=run_name)
def reference_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    with exclusive(reference_path(params), "`ddim reference`"):
        result = reference_task(params)
    create_markdown_artifact(key="reference-statistics", markdown=_table("FID reference", result))
    return result


@stage_task("fid")
def evaluate_task(params: Params) -> dict[str, Any]:
    return evaluate_samples(params)


@flow(
    name="evaluate",
    description="FID of the samples against the reference statistics; metrics.json.",
    flow_run_name=run_name,
)
def evaluate_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    with exclusive(params.paths.metrics, "`ddim evaluate`"):
        metrics = evaluate_task(params)
    keys = ["fid", "num_samples", "sampler", "steps", "eta", "spacing", "nfe", "reference_count"]
    create_table_artifact(key="fid", table=[{k: metrics[k] for k in keys}], description="FID of this sampling config")
    return metrics


@stage_task("sweep-cell")
def sweep_cell_task(params_file: str, overrides: list[str], steps: int, eta: int | float) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    if params.sweep.nproc_per_node > 1:
        cell_args = ["--steps", str(steps), "--eta", str(eta)]
        return run_ranks(
            "tasks.sweep", params_file, overrides, torchrun_launcher(params.sweep.nproc_per_node), cell_args
        )
    return run_cell(params, steps, eta)


@flow(
    name="sweep-cell",
    description="One cell of the DDIM sweep: sample and score steps x eta in one pass.",
    flow_run_name=run_name,
)
def sweep_cell_flow(
    params_file: str = "params.yaml", overrides: list[str] | None = None, steps: int = 100, eta: int | float = 0.0
) -> dict[str, Any]:
    output = Path(load_params(params_file, overrides).paths.sweep) / f"cell-{cell_name(steps, eta)}"
    with exclusive(output, "`ddim sweep-cell`"):
        cell = sweep_cell_task(params_file, list(overrides or []), steps, eta)
    create_markdown_artifact(key="sweep-cell", markdown=_table(f"Sweep cell {cell_name(steps, eta)}", cell))
    return cell


def _publish_sweep_table(cells: list[dict[str, Any]]) -> None:
    rows = [{k: v for k, v in cell.items() if k in SWEEP_COLUMNS} for cell in cells]
    create_table_artifact(key="sweep-table", table=rows, description="DDIM sweep: FID per steps x eta")


@flow(
    name="sweep-table",
    description="The sweep's table (csv, markdown) and FID-vs-NFE plot from its cells.",
    flow_run_name=run_name,
)
def sweep_table_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    with exclusive(Path(params.paths.sweep) / "table", "`ddim sweep-table`"):
        FINISHED["result"] = result = write_table(params)
    _publish_sweep_table(result["cells"])
    return result


@flow(
    name="ddim-sweep",
    description="The DDIM sweep through DVC: only missing or changed cells run, then the table.",
    flow_run_name=run_name,
)
def sweep_flow(force: bool = False, overrides: list[str] | None = None, params_file: str = "params.yaml") -> dict:
    _stream(dvc_command(["sweep-table"], force, list(overrides or [])))
    params = load_params(params_file)  # as DVC left it (an experiment's --set values included)
    cells = table_rows(params)
    _publish_sweep_table(cells)
    return {"table": str(Path(params.paths.sweep) / "table.md"), "cells": len(cells)}


@stage_task("reconstruct-images")
def reconstruct_task(params: Params) -> dict[str, Any]:
    return run_reconstruct(params)


@flow(
    name="reconstruct",
    description="DDIM section 5.4: encode images to x_T, decode them, the error per step count.",
    flow_run_name=run_name,
)
def reconstruct_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    with exclusive(Path(params.paths.latent) / "reconstruct", "`ddim reconstruct`"):
        result = reconstruct_task(params)
    create_table_artifact(key="reconstruction", table=result["rows"], description="reconstruction error per S")
    return result


@stage_task("interpolate-latents")
def interpolate_task(params: Params) -> dict[str, Any]:
    return run_interpolate(params)


@flow(
    name="interpolate",
    description="DDIM section 5.3: decode slerp and lerp paths between latents into a grid.",
    flow_run_name=run_name,
)
def interpolate_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    with exclusive(Path(params.paths.latent) / "interpolation", "`ddim interpolate`"):
        result = interpolate_task(params)
    create_markdown_artifact(key="interpolation", markdown=_table("Interpolation", {"grid": f"`{result['grid']}`"}))
    return result


def _table(title: str, values: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items()]
    return "\n".join([f"# {title}", "", "| | |", "|---|---|", *rows])


def _venv_env() -> dict[str, str]:
    """The environment for DVC and its stage commands: this interpreter's bin folder first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _stream(cmd: list[str]) -> None:
    """Run ``cmd``, sending each output line to the flow's log; raise if it fails."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_venv_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip():
            logger.info(line.rstrip())
    if proc.wait() != 0:
        raise PipelineError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}: see the log above")


def _dvc() -> str:
    """The dvc executable installed beside this interpreter."""
    return str(Path(sys.executable).with_name("dvc"))


def dvc_command(targets: list[str], force: bool, overrides: list[str]) -> list[str]:
    """``dvc repro`` of ``targets`` (default: the main pipeline, up to ``evaluate``, without the sweep); with
    param overrides, ``dvc exp run -S key=value`` (recorded as a DVC experiment)."""
    dvc = _dvc()
    sets = [arg for o in overrides for arg in ("-S", o)]
    cmd = [dvc, "exp", "run", *sets] if overrides else [dvc, "repro"]
    return cmd + (["--force"] if force else []) + (list(targets) or ["evaluate"])


@flow(
    name="ddim-pipeline",
    description="Run the DVC pipeline (only what changed), then publish its metrics.",
    flow_run_name=run_name,
)
def pipeline_flow(
    targets: list[str] | None = None,
    force: bool = False,
    overrides: list[str] | None = None,
    params_file: str = "params.yaml",
    mlflow_ui: str = "http://127.0.0.1:5000",
) -> dict[str, Any]:
    _stream(dvc_command(list(targets or []), force, list(overrides or [])))
    shown = subprocess.run(
        [_dvc(), "metrics", "show", "--json"],
        capture_output=True,
        text=True,
        env=_venv_env(),
        check=True,
    )
    metrics = json.loads(shown.stdout or "{}")
    rows = [
        {"file": name, **values}
        for workspace in metrics.values()
        for name, entry in workspace.get("data", {}).items()
        for values in [entry.get("data", {})]
    ]
    if rows:
        create_table_artifact(key="dvc-metrics", table=rows, description="dvc metrics show")
    params = load_params(params_file)
    run_id = read_run_id(Path(params.paths.train))
    if run_id:
        create_link_artifact(key="mlflow-run", link=f"{mlflow_ui}/#/runs/{run_id}", link_text=f"MLflow run {run_id}")
    return {"metrics": rows, "mlflow_run_id": run_id}
