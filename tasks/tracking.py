"""MLflow: the one place that knows tracking URIs, run ids, and what is logged where.

Layout in MLflow: one run per trained model (experiment ``tracking.experiment``, default ``ddim``) holding the
flattened params, stepped training metrics, sample grids and ``model.pt``; each sampling/evaluation config
is a child run of it. Only rank 0 of a distributed job tracks anything (others get a :class:`NullTracker`).

The default store is ``sqlite:///<current dir>/mlflow.db`` with artifacts in ``<current dir>/mlartifacts``,
absolute paths so that a stage run from another directory still finds them. ``tracking.uri`` in params.yaml,
or else the ``MLFLOW_TRACKING_URI`` environment variable, points elsewhere (e.g. ``http://127.0.0.1:5000``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.config import TrackingConfig
from tasks.files import atomic_path, exclusive

if TYPE_CHECKING:
    import pandas as pd

RUN_ID_FILE = "mlflow_run_id"

# MLflow's sqlite store logs alembic migrations at INFO on every new database: keep the console for the pipeline.
logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a local sqlite database; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``. Its first use creates (migrates) a new sqlite database; two stages that
    start at once would both migrate it and one would die, so a local database is opened under a lock."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    with exclusive(Path(uri.removeprefix("sqlite:///")), "MLflow database set-up", wait=True):
        return MlflowClient(tracking_uri=uri)  # creates the store, and with it the tables


# MLflow 3's UI opens an experiment in the view its kind names; without the tag it may guess GenAI (traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a local store, marked as model training for the
    UI) if it does not exist yet; an existing one without a kind is marked too."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if "mlflow.experimentKind" not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri), tags=EXPERIMENT_KIND)
    except MlflowException:  # another process created it a moment ago
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 2e-4}}`` -> ``{"train.lr": "0.0002"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def read_run_id(folder: Path) -> str | None:
    path = Path(folder) / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


def write_run_id(run_id: str, folder: Path) -> None:
    with atomic_path(Path(folder) / RUN_ID_FILE) as tmp:
        tmp.write_text(run_id + "\n")


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get: every call does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """One MLflow run, driven through an explicit client (no global "active run" state)."""

    def __init__(self, uri: str, run_id: str) -> None:

        self.client, self.run_id, self.uri = mlflow_client(uri), run_id, uri

    @classmethod
    def for_training(
        cls,
        cfg: TrackingConfig,
        params: dict[str, Any],
        tags: dict[str, str],
        run_id_dir: Path,
        run_name: str | None = None,
    ) -> Tracker:
        """Continue the run whose id is stored in ``run_id_dir``, or start one and store its id there."""
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(cfg)
        client = mlflow_client(uri)
        run_id = read_run_id(run_id_dir)
        if run_id is not None:
            try:
                client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
            except MlflowException:
                run_id = None  # the store was reset: start a new run
        if run_id is None:
            run_id = client.create_run(
                _experiment_id(client, cfg.experiment, uri), tags=tags, run_name=run_name
            ).info.run_id
            write_run_id(run_id, run_id_dir)
        tracker = cls(uri, run_id)
        tracker.log_params(params)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        """Log flattened params; on a resumed run, a changed value is recorded as a ``param_changed.*`` tag."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        flat = flatten(params)
        new = [Param(k, v[:6000]) for k, v in flat.items() if k not in logged]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        for k, v in flat.items():
            if k in logged and logged[k] != v:
                self.client.set_tag(self.run_id, f"param_changed.{k}", v)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def log_child_run(
    cfg: TrackingConfig,
    parent_run_id: str | None,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    artifacts: list[Path] = (),
    tags: dict[str, str] | None = None,
) -> str:
    """One finished run nested under the training run (or alone in the experiment if there is none): its
    params, its numeric metrics, and ``artifacts`` (images show on the run page)."""
    uri = tracking_uri(cfg)
    client = mlflow_client(uri)
    if parent_run_id is not None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = _experiment_id(client, cfg.experiment, uri)
    tags = dict(tags or {})
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    tracker = Tracker(uri, run_id)
    tracker.log_params(params)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    tracker.log_metrics(numbers, 0)
    for path in artifacts:
        if Path(path).is_file():
            tracker.log_artifact(Path(path))
    tracker.finish()
    return run_id


def log_evaluation(
    cfg: TrackingConfig,
    parent_run_id: str | None,
    params: dict[str, Any],
    metrics: dict[str, Any],
    grid: Path | None,
    tags: dict[str, str] | None = None,
) -> str:
    """One finished child run of the training run: the sampling config, its FID and NFE, the sample grid."""
    s = metrics
    name = f"{s['sampler']}-{s['steps'] or 'adaptive'}steps-eta{s['eta']}" + (
        f"-{s['spacing']}" if s["spacing"] else ""
    )
    tags = {"stage": "evaluate", **{k: str(metrics[k]) for k in ("device", "precision") if k in metrics}} | (tags or {})
    return log_child_run(cfg, parent_run_id, name, params, metrics, [grid] if grid is not None else [], tags)


COUNTS = ("num_samples", "reference_count")  # an FID is comparable only with FIDs at the same counts


def _sampling_row(child: Any) -> dict[str, Any]:
    """A child run's sampling config and results; settings that do not apply to its sampler stay empty."""
    p, m = child.data.params, child.data.metrics
    ddim = p.get("sample.sampler") == "ddim"
    return {
        "sampler": p.get("sample.sampler"),
        "steps": p.get("sample.steps") if ddim else None,
        "spacing": p.get("sample.spacing") if ddim else None,
        "base_step": None if ddim else p.get("sample.base_step_size"),
        "eta": p.get("sample.eta"),
        **{k: int(m[k]) if m.get(k) is not None else None for k in COUNTS},
        "nfe": m.get("nfe"),
        "fid": m.get("fid"),
    }


def compare_runs(cfg: TrackingConfig) -> pd.DataFrame:
    """One row per (training run, sampling config): the params that differ between training runs, the final
    loss, and each child run's sampling settings, FID and NFE; sorted by FID (runs without one last).

    An evaluation repeated with the same sampling params and image counts shows once, with its newest FID.
    """
    import pandas as pd

    client = mlflow_client(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return pd.DataFrame()
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    parents = [r for r in runs if r.data.tags.get("stage") == "train"]
    children = sorted(
        (r for r in runs if r.data.tags.get("stage") == "evaluate"), key=lambda r: r.info.start_time, reverse=True
    )
    varying = sorted(
        k
        for k in {k for r in parents for k in r.data.params}
        if len({r.data.params.get(k) for r in parents}) > 1 and not k.startswith("paths.")
    )
    rows = []
    for parent in parents:
        base = {
            "train_run": parent.info.run_id[:8],
            "status": parent.info.status,
            "final_loss": parent.data.metrics.get("loss"),
            **{k: parent.data.params.get(k) for k in varying},
        }
        mine = [c for c in children if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        seen = set()
        for child in mine:  # newest first
            key = (tuple(sorted(child.data.params.items())), *(child.data.metrics.get(k) for k in COUNTS))
            if key not in seen:
                seen.add(key)
                rows.append({**base, **_sampling_row(child)})
        if not mine:
            rows.append(base)
    table = pd.DataFrame(rows)
    if "fid" in table:
        table = table.sort_values("fid", na_position="last", kind="stable").reset_index(drop=True)
    return table
