"""Prefect flows: one per stage of :data:`pipelines.stages.STAGES` (:data:`FLOWS`, all made by
:func:`stage_flow`), and the two that run DVC (``ddim pipeline``, ``ddim sweep``). A flow only orchestrates:
the work is in ``tasks/<stage>.py``.

A stage's flow takes the params file and ``--set`` style overrides as its parameters (and the stage's options,
such as a sweep cell's steps and eta), so a deployment or a UI run can change any param the way the CLI does.
It holds an exclusive lock on the stage's output while it runs (``tasks.common.files.exclusive``): a second run
on the same output stops at once, naming the first. Its task runs the stage in this process, or under
``torchrun`` (:func:`launch`); tasks that write files opt out of Prefect's result cache: DVC decides what is up
to date.

A Prefect API that stops answering during a stage does not stop the work: progress is sent from a background
thread (:class:`ProgressArtifact`), and each stage's task hands its result to :data:`FINISHED` as soon as its
outputs are complete, where the CLI finds it when Prefect fails afterwards (the task's end state, the
artifacts) and ends the command with a warning and exit status 0.

Prefect reads ``PREFECT_API_URL`` once, when it is first imported: import this module only after
``pipelines.prefect_api.TemporaryServer.launch`` (which refuses to start a server once Prefect is imported).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
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

from pipelines.stages import STAGES, Artifact, Stage, sweep_rows
from tasks.common.config import Params, SampleConfig, SweepConfig, TrainConfig, load_params
from tasks.common.errors import UserError
from tasks.common.files import exclusive
from tasks.common.tracking import read_run_id
from tasks.prepare import download
from tasks.sweep_table import table_rows

Launched = TrainConfig | SampleConfig | SweepConfig  # the sections whose stages run under torchrun


class PipelineError(UserError):
    """A pipeline command failed."""


FINISHED: dict[str, Any] = {}  # "result": the result of the stage whose outputs are complete (one per command)


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
    options = [f"{k}={v}" for k, v in (args.get("options") or {}).items()]
    return " ".join([name, *options, *overrides, *(args.get("targets") or [])])


def _retryable(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry only what can succeed on retry (a network hiccup); a checksum mismatch or a 404 fails at once."""
    return bool(getattr(state.data, "retryable", False))


@task(
    name="download",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=_retryable,
)
def download_task(url: str, dest: Path, md5: str) -> Path:
    return download(url, dest, md5)


def stream(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd``, each line it prints going to the flow's log; return its exit status."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip():
            logger.info(line.rstrip())
    return proc.wait()


def torchrun_launcher(nproc: int, section: Launched | None = None, options: dict[str, Any] | None = None) -> list[str]:
    """``torchrun`` for ``nproc`` processes on this machine; with ``section.nnodes > 1`` (the train, sample or
    sweep section), this machine's share of a job on several, which meet through the c10d rendezvous at
    ``section.rdzv_endpoint``, as the job ``section.rdzv_id`` (and the stage's ``options``, so that each sweep
    cell is a job of its own). Only training restarts failed ranks (``train.max_restarts``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    restarts = f"--max-restarts={getattr(section, 'max_restarts', 0)}"
    if section is None or section.nnodes == 1:
        return [*launcher, "--standalone", restarts]
    endpoint, job = section.rdzv_endpoint, "-".join([section.rdzv_id, *(str(v) for v in (options or {}).values())])
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job}"]
    return [*launcher, f"--nnodes={section.nnodes}", *rendezvous, restarts]


def run_ranks(
    stage: Stage, params_file: str, overrides: list[str], options: dict[str, Any], launcher: list[str]
) -> Any:
    """Run the stage's ranks (``python -m pipelines.ranks``) under ``launcher``, their output streamed into the
    flow's log; return the result rank 0 wrote to the file named here (``{}`` on the other machines of a
    multi-node job, where rank 0 does not run). A failure raises the ranks' own error line."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    flags = [arg for name, value in options.items() for arg in (f"--{name}", str(value))]
    with tempfile.TemporaryDirectory(prefix=f"ddim-{stage.name}-") as folder:
        result_file = Path(folder) / "result.json"
        command = [*launcher, "-m", "pipelines.ranks", stage.name, "--result", str(result_file), *flags]
        status = stream([*command, "--params", params_file, *sets])
        answer = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if status != 0:
        raise PipelineError(answer.get("error") or f"{' '.join(launcher[2:])} failed (exit {status}): see the log")
    return answer


def launch(stage: Stage, params_file: str, overrides: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Run ``stage`` in this process, or under ``torchrun`` when its section asks for more processes."""
    params = load_params(params_file, overrides)
    section = getattr(params, stage.ranks) if stage.ranks else None
    if section is not None and (section.nproc_per_node > 1 or section.nnodes > 1):
        launcher = torchrun_launcher(section.nproc_per_node, section, options)
        return run_ranks(stage, params_file, overrides, options, launcher)
    if stage.progress is None:
        return stage.run(params, **options)
    progress = ProgressArtifact(stage.progress, f"{stage.name}: done (%)")
    try:
        return stage.run(params, **options, progress=lambda done, total, *_: progress.update(100.0 * done / total))
    finally:
        progress.close()


def publish(key: str, artifact: Artifact) -> None:
    if artifact.table is not None:
        create_table_artifact(key=key, table=artifact.table, description=artifact.description)
    else:
        create_markdown_artifact(key=key, markdown=artifact.markdown, description=artifact.description)


# What the flow on a machine of a multi-machine job without rank 0 shows: the results are on rank 0's machine.
ELSEWHERE = Artifact(
    "# This machine's ranks are done\n\nRank 0 of the job ran on another machine: its results are there."
)


def output_lock(stage: Stage, params: Params, options: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The exclusive lock on the stage's output for the flow's run; none for a job on several machines, whose
    output every machine shares (the machine of rank 0 holds it: ``pipelines.ranks``)."""
    section = getattr(params, stage.ranks) if stage.ranks else None
    if section is not None and section.nnodes > 1:
        return contextlib.nullcontext()
    return exclusive(stage.locks(params, **options), f"`ddim {stage.name}`")


def stage_flow(stage: Stage) -> Any:
    """The Prefect flow of ``stage``: lock its output, download what it needs, run its task, publish."""

    @task(name=stage.task, cache_policy=NO_CACHE)
    def work(params_file: str, overrides: list[str], options: dict[str, Any]) -> dict[str, Any]:
        FINISHED["result"] = result = launch(stage, params_file, overrides, options)
        return result  # kept in FINISHED too: the stage's outputs are complete, whatever Prefect can still record

    @flow(name=stage.name, description=stage.help, flow_run_name=run_name)
    def run_stage(
        params_file: str = "params.yaml", overrides: list[str] | None = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        overrides, options = list(overrides or []), dict(options or {})
        params = load_params(params_file, overrides)
        with output_lock(stage, params, options):
            if stage.fetch is not None and (wanted := stage.fetch(params)) is not None:
                options["archive"] = download_task(*wanted)
            result = work(params_file, overrides, options)
        publish(stage.artifact, stage.publish(result, params) if result else ELSEWHERE)
        return result

    return run_stage


FLOWS: dict[str, Any] = {name: stage_flow(stage) for name, stage in STAGES.items()}


@flow(
    name="ddim-sweep",
    description="The sweep through DVC (DDIM over steps x eta, the ODE solvers over solver x steps): only missing"
    " or changed cells run, then the table.",
    flow_run_name=run_name,
)
def sweep_flow(force: bool = False, overrides: list[str] | None = None, params_file: str = "params.yaml") -> dict:
    run_dvc(dvc_command(["sweep-table"], force, list(overrides or [])))
    params = load_params(params_file)  # as DVC left it (an experiment's --set values included)
    cells = table_rows(params)
    publish("sweep-table", sweep_rows(cells))
    return {"table": str(Path(params.paths.sweep) / "table.md"), "cells": len(cells)}


def _venv_env() -> dict[str, str]:
    """The environment for DVC and its stage commands: this interpreter's bin folder first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_dvc(cmd: list[str]) -> None:
    """Run a DVC command with this interpreter's tools on PATH, its output in the flow's log; raise if it fails."""
    if (status := stream(cmd, env=_venv_env())) != 0:
        raise PipelineError(f"`{' '.join(cmd)}` failed with exit status {status}: see the log above")


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
    run_dvc(dvc_command(list(targets or []), force, list(overrides or [])))
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
