"""MLflow: the one place that knows tracking URIs, run ids, and what is logged where.

Layout in MLflow: one run per trained model (experiment ``tracking.experiment``, default ``ddim``) holding the
flattened params, stepped training metrics, sample grids and ``model.pt``; each sampling/evaluation config
is a child run of it. Only rank 0 of a distributed job tracks anything (others get a :class:`NullTracker`).

A tracking server that stops answering never stops or stalls a stage: a training run's logging goes through
an :class:`Outbox`, one background thread that sends the calls in order and, while the server is away, keeps
them and retries (the metrics are in ``train_metrics.csv`` all along), catching up when it answers again. At
the end it waits up to ``tracking.flush_timeout`` seconds; what is still unsent is named in a
:class:`TrackingWarning`, and the stage ends with its outputs complete. A server that is away when a run or a
child run starts leaves that run unrecorded, with the same warning.

The default store is ``sqlite:///<project dir>/mlflow.db`` with artifacts in ``<project dir>/mlartifacts``,
absolute paths so that a stage run from another directory still finds them; the project dir is the current
one, or under DVC the project's root (``DVC_ROOT``), so that a queued ``dvc exp run`` logs to the project's
store and not to one in its temporary copy, and its runs carry the DVC experiment's name as the tag
``dvc.experiment``. ``tracking.uri`` in params.yaml, or else the ``MLFLOW_TRACKING_URI`` environment variable,
points elsewhere (e.g. ``http://127.0.0.1:5000``).

``tracking.enabled: false`` turns all of it off, for a machine without MLflow: a training run gets a
:class:`NullTracker`, no child run is logged, ``ddim runs`` says that tracking is off, and nothing imports
``mlflow``. The stages' own outputs (``train_metrics.csv``, the metrics file) are the same either way.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.common.config import SAMPLER_SETTINGS, SETTING_KEYS, TrackingConfig
from tasks.common.errors import UserError, first_line
from tasks.common.files import atomic_path, exclusive, file_hash, project_path

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
    return f"sqlite:///{project_path('mlflow.db').resolve()}"  # the project's, also for a queued DVC experiment


def experiment_tags() -> dict[str, str]:
    """The DVC experiment a stage runs in (``dvc exp run``, queued or not), as MLflow tags: what ties an MLflow
    run to its row in ``dvc exp show``. DVC passes the name to stage commands in ``DVC_EXP_NAME``."""
    names = {"dvc.experiment": "DVC_EXP_NAME", "dvc.baseline_rev": "DVC_EXP_BASELINE_REV"}
    return {tag: os.environ[var] for tag, var in names.items() if os.environ.get(var)}


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a local sqlite database; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


TRACKING_OFF = "tracking is off (tracking.enabled is false)"
TURN_ON = "set tracking.enabled: true in params.yaml (or --set tracking.enabled=true)"


class TrackingWarning(UserWarning):
    """Something was not recorded in MLflow (its server did not answer); the stage went on."""


# MLflow's HTTP client retries a call for minutes by default (7 retries, backoff factor 2, 120 s timeouts):
# a stopped server would stall every logging call that long. The Outbox retries instead, in the background.
# (60 s timeouts: long enough to upload a model.pt through an artifact-proxying server.)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}  # fmt: skip


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``. Its first use creates (migrates) a new sqlite database; two stages that
    start at once would both migrate it and one would die, so a local database is opened under a lock."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)  # the user's own settings win
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # a line per retry, else
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


def write_or_forget_run_id(run_id: str | None, folder: Path) -> None:
    """The model's run id beside it; None (MLflow did not answer): the file goes, lest the stages after
    nest their runs under an earlier model's run."""
    if run_id is None:
        (Path(folder) / RUN_ID_FILE).unlink(missing_ok=True)
    else:
        write_run_id(run_id, folder)


# MLflow's error codes for "no answer": a connection that failed, a 5xx, a store that could not be used.
NO_ANSWER = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def server_answered(error: BaseException) -> bool:
    """Whether an MLflow error is the store's answer (a refusal that a retry would repeat: a run that does not
    exist, a bad value), rather than no answer at all (a refused connection, a timeout, a 5xx after retries, a
    locked or damaged database)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code not in NO_ANSWER


def not_recorded(where: str, what: str, error: BaseException | None = None) -> None:
    reason = f" ({first_line(error)})" if error else ""
    warnings.warn(f"MLflow at {where} is unavailable{reason}: not recorded: {what}", TrackingWarning, stacklevel=3)


class Outbox:
    """Tracking calls sent in order by one background thread, so that the stage never waits for the server.

    A call that does not reach the server is kept and retried (1 s, doubling to 30 s) until it goes through;
    one the server refuses is dropped and named at the end. :meth:`close` waits up to ``timeout`` seconds for
    the rest, then returns what was not recorded (the thread, a daemon, ends with the process)."""

    def __init__(self, where: str) -> None:
        self.where, self.outage, self.refused = where, False, []
        self.calls: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self.wake, self.closing = threading.Condition(), False
        self.thread = threading.Thread(target=self._send_all, name="mlflow-outbox", daemon=True)
        self.thread.start()

    def put(self, what: str, call: Callable[[], Any]) -> None:
        with self.wake:
            self.calls.append((what, call))
            self.wake.notify()

    def _send_all(self) -> None:
        delay = 1.0
        while True:
            with self.wake:
                while not self.calls and not self.closing:
                    self.wake.wait()
                if not self.calls:
                    return
                what, call = self.calls[0]
            try:
                call()
            except Exception as e:
                if server_answered(e):
                    self.refused.append(f"{what} (refused: {first_line(e)})")
                else:
                    if not self.outage:
                        self.outage = True
                        logging.getLogger(__name__).warning(
                            "MLflow at %s does not answer (%s): training goes on, its logging is kept and sent "
                            "when the server answers again", self.where, e.__class__.__name__,
                        )  # fmt: skip
                    with self.wake:
                        self.wake.wait(timeout=min(delay, 2.0) if self.closing else delay)
                    delay = min(2 * delay, 30.0)
                    continue
            with self.wake:
                if self.calls and self.calls[0][1] is call:
                    self.calls.popleft()
            if self.outage and not self.calls:
                self.outage = False
                logging.getLogger(__name__).warning("MLflow at %s answers again: caught up", self.where)
            delay = 1.0

    def close(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s for the calls still queued; what was not recorded, in words."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout)
        with self.wake:
            unsent, _ = [what for what, _ in self.calls], self.calls.clear()
        return self.refused + unsent


def summarise(items: list[str]) -> str:
    """``metrics at step 5``, ``metrics at step 10``, ... -> ``metrics at 2 steps (5 ... 10)``; others as they are."""
    matches = [re.fullmatch(r"metrics at step (\d+)", w) for w in items]
    steps = [int(m.group(1)) for m in matches if m]
    rest = [w for w, m in zip(items, matches, strict=True) if not m]
    head = [f"metrics at {len(steps)} steps ({steps[0]} ... {steps[-1]}; they are in the CSV)"] if steps else []
    return ", ".join(head + rest)


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get: every call does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int, model: Any = None) -> None: ...
    def send(self, what: str, call: Callable[[Any], Any]) -> None: ...
    def log_image(self, image: np.ndarray, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str, timeout: float) -> None: ...
    def flush(self, timeout: float) -> None: ...


class Tracker(NullTracker):
    """One MLflow run, driven through an explicit client (no global "active run" state). With ``background``,
    the logging calls go through an :class:`Outbox` (a training run); else each is made at once."""

    def __init__(self, uri: str, run_id: str, background: bool = False) -> None:
        self.client, self.run_id, self.uri = mlflow_client(uri), run_id, uri
        self.outbox = Outbox(uri) if background else None

    def _send(self, what: str, call: Callable[[], Any]) -> None:
        if self.outbox is None:
            call()
        else:
            self.outbox.put(what, call)

    @classmethod
    def for_training(
        cls,
        cfg: TrackingConfig,
        params: dict[str, Any],
        tags: dict[str, str],
        run_id_dir: Path,
        run_name: str | None = None,
    ) -> Tracker:
        """Continue the run whose id is stored in ``run_id_dir``, or start one and store its id there; its logging
        then goes through an :class:`Outbox`. A server that does not answer now: a warning, and no tracking.
        Tracking off (``cfg.enabled`` false): no tracking, and MLflow is not imported."""
        if not cfg.enabled:
            return NullTracker()
        try:
            return cls._open_training_run(cfg, params, tags, run_id_dir, run_name)
        except Exception as e:
            if server_answered(e):
                raise
            not_recorded(tracking_uri(cfg), "this whole run (its metrics are in train_metrics.csv)", e)
            return NullTracker()

    @classmethod
    def _open_training_run(
        cls, cfg: TrackingConfig, params: dict[str, Any], tags: dict[str, str], run_id_dir: Path, run_name: str | None
    ) -> Tracker:
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(cfg)
        client = mlflow_client(uri)
        run_id = read_run_id(run_id_dir)
        if run_id is not None:
            try:
                client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                if not server_answered(e):
                    raise
                run_id = None  # the store was reset: start a new run
        tags = {**tags, **experiment_tags()}
        if run_id is None:
            run_id = client.create_run(
                _experiment_id(client, cfg.experiment, uri), tags=tags, run_name=run_name
            ).info.run_id
            write_run_id(run_id, run_id_dir)
        tracker = cls(uri, run_id, background=True)
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

    def log_metrics(self, metrics: dict[str, float], step: int, model: Any = None) -> None:
        """Metrics at ``step``, linked to ``model`` where given: a logged model's id, or an object whose ``model_id``
        is set by the time they are sent (a :class:`tasks.common.logged_model.ModelUpload` sent before them)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)

        def send() -> None:  # the model's id is known once it is sent, which the Outbox does first
            model_id = model if isinstance(model, str) or model is None else model.model_id
            batch = [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)

        self._send(f"metrics at step {step}", send)

    def send(self, what: str, call: Callable[[Any], Any]) -> None:
        """``call(client)`` with this run's ``MlflowClient``, in order with the other calls (through the Outbox of a
        training run: retried after an outage, so it must be safe to call again); ``what`` names it if unsent."""
        self._send(what, functools.partial(call, self.client))

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        image = image.copy()  # sent later: the caller may reuse its array
        call = functools.partial(self.client.log_image, self.run_id, image, artifact_file=artifact_file)
        self._send(f"image {artifact_file}", call)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        where = str(path)
        self._send(f"artifact {Path(path).name}", lambda: self.client.log_artifact(self.run_id, where, artifact_path))

    def finish(self, status: str, timeout: float) -> None:
        """End the run with ``status``; with an outbox, wait up to ``timeout`` s for what is queued, then warn
        about what was not recorded."""
        self._send(f"the run's end ({status})", lambda: self.client.set_terminated(self.run_id, status=status))
        self.flush(timeout)

    def flush(self, timeout: float) -> None:
        """Send what is queued, waiting up to ``timeout`` s; warn about what was not recorded. The last call."""
        if self.outbox is not None and (missed := self.outbox.close(timeout)):
            not_recorded(self.uri, f"{summarise(missed)} in run {self.run_id}")


CPU_METRIC = "cpu_utilization_percentage"  # one of MLflow's system metrics, on every machine


class SystemMetrics:
    """MLflow's own system metrics (its CPU and memory, disk, network and, with nvidia-ml-py, GPU monitors), sampled
    every ``interval`` seconds by a daemon thread and logged to ``tracker``'s run as ``system/...`` (what MLflow's UI
    shows under System metrics). They go through the tracker's Outbox, so a server that stops answering delays
    them and never the stage; :meth:`stop` ends the thread. A resumed run continues its steps."""

    def __init__(self, tracker: Tracker, interval: float, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "no GPU monitor" on every CPU run
        self.monitor = SystemMetricsMonitor(tracker.run_id, interval, tracking_uri=tracker.uri)  # its monitors only
        self.tracker, self.interval, self.stopped = tracker, interval, threading.Event()
        self.first_step = 0
        if resume:  # after the steps the run has (MLflow's own monitor restarts at 0 unless told to read them)
            history = tracker.client.get_metric_history(tracker.run_id, f"system/{CPU_METRIC}")
            self.first_step = max((m.step for m in history), default=-1) + 1
        self.thread = threading.Thread(target=self._sample, name="system-metrics", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, tracker: NullTracker, interval: float, resume: bool = False) -> SystemMetrics | None:
        """Sampling for ``tracker``'s run (None: no run, or ``interval`` 0, ``tracking.system_metrics``)."""
        if not interval or not isinstance(tracker, Tracker) or tracker.outbox is None:
            return None
        try:
            return cls(tracker, interval, resume)
        except Exception as e:  # resuming reads the run; the monitors read the machine: neither may stop the stage
            not_recorded(tracker.uri, "system metrics", e)
            return None

    def _sample(self) -> None:
        from mlflow.entities import Metric

        monitor, step = self.monitor, self.first_step
        while not self.stopped.wait(self.interval):
            try:
                monitor.collect_metrics()
                now, values = int(time.time() * 1000), monitor.aggregate_metrics()
                for each in monitor.monitors:
                    each.clear_metrics()
            except Exception as e:  # a monitor that cannot read the machine: no more samples, the stage goes on
                logging.getLogger(__name__).warning("system metrics stopped: %s", first_line(e))
                return
            batch = [Metric(f"system/{k}", float(v), now, step) for k, v in values.items()]
            self.tracker.send(
                f"system metrics {step}", lambda client, b=batch: client.log_batch(self.run_id, metrics=b)
            )
            step += 1

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def _child_experiment(client: Any, cfg: TrackingConfig, uri: str, parent_run_id: str | None) -> tuple[str, str | None]:
    """The experiment of a child run of ``parent_run_id`` and the parent it can have (None: the store no longer
    holds the parent, a new mlflow.db: a run of its own in ``cfg.experiment``)."""
    if parent_run_id is not None:
        try:
            return client.get_run(parent_run_id).info.experiment_id, parent_run_id
        except Exception as e:
            if not server_answered(e):
                raise
    return _experiment_id(client, cfg.experiment, uri), None


def open_child_run(
    cfg: TrackingConfig, parent_run_id: str | None, name: str, params: dict[str, Any], tags: dict[str, str]
) -> NullTracker:
    """A run nested under the training run (or alone in the experiment if there is none), open while a stage works
    (its logging through an :class:`Outbox`; end it with ``finish``). Tracking off, or a server that does not
    answer now (with a :class:`TrackingWarning`): a :class:`NullTracker`."""
    if not cfg.enabled:
        return NullTracker()
    try:
        uri = tracking_uri(cfg)
        client = mlflow_client(uri)
        experiment_id, parent_run_id = _child_experiment(client, cfg, uri, parent_run_id)
        tags = {**tags, **experiment_tags(), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        tracker = Tracker(uri, client.create_run(experiment_id, tags=tags, run_name=name).info.run_id, background=True)
        tracker.log_params(params)
        return tracker
    except Exception as e:
        if server_answered(e):
            raise
        not_recorded(tracking_uri(cfg), f"the run {name}", e)
        return NullTracker()


@contextlib.contextmanager
def tracked_run(
    cfg: TrackingConfig, parent_run_id: str | None, name: str, params: dict[str, Any], tags: dict[str, str]
) -> Iterator[NullTracker]:
    """A child run open while the block works (:func:`open_child_run`), with the system metrics sampled into it
    (``tracking.system_metrics``); it ends FINISHED, or FAILED (KILLED on Ctrl-C or SIGTERM) if the block raises."""
    tracker = open_child_run(cfg, parent_run_id, name, params, tags)
    system, status = SystemMetrics.start(tracker, cfg.system_metrics), "FINISHED"
    try:
        yield tracker
    except BaseException as e:
        status = "FAILED" if isinstance(e, Exception) else "KILLED"  # KILLED: Ctrl-C, SIGTERM
        raise
    finally:
        if system is not None:
            system.stop()
        tracker.finish(status, cfg.flush_timeout if status == "FINISHED" else min(cfg.flush_timeout, 5.0))


def log_child_run(
    cfg: TrackingConfig,
    parent_run_id: str | None,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    artifacts: list[Path] = (),
    tags: dict[str, str] | None = None,
    model_sha256: str | None = None,
) -> str | None:
    """One finished run nested under the training run (or alone in the experiment if there is none): its
    params, its numeric metrics, and ``artifacts`` (images show on the run page); with ``model_sha256`` (of the
    model.pt it ran), its metrics linked to that file's logged model (tag ``model_id``). Its id; None, with a
    :class:`TrackingWarning`, if the server does not answer (the stage's own outputs are complete). Tracking
    off: nothing is logged, and None."""
    if not cfg.enabled:
        return None
    try:
        uri = tracking_uri(cfg)
        client = mlflow_client(uri)
        experiment_id, parent_run_id = _child_experiment(client, cfg, uri, parent_run_id)
        tags = {**(tags or {}), **experiment_tags()}
        if parent_run_id is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        model_id = find_logged_model(client, experiment_id, parent_run_id, model_sha256) if model_sha256 else None
        if model_id is not None:
            tags["model_id"] = model_id
        run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        tracker = Tracker(uri, run_id)
        tracker.log_params(params)
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and type(v) is not bool}
        tracker.log_metrics(numbers, 0, model=model_id)
        for path in artifacts:
            if Path(path).is_file():
                tracker.log_artifact(Path(path))
        tracker.finish("FINISHED", cfg.flush_timeout)
        return run_id
    except Exception as e:
        if server_answered(e):
            raise
        not_recorded(tracking_uri(cfg), f"the run {name} ({', '.join(f'{k}={v}' for k, v in metrics.items())})", e)
        return None


def log_evaluation(
    cfg: TrackingConfig,
    parent_run_id: str | None,
    params: dict[str, Any],
    metrics: dict[str, Any],
    grid: Path | None,
    *,
    model_sha256: str,
    reference: Path,
    clip_x0: bool,
) -> str | None:
    """One finished child run of the training run: the sampling config, its FID and NFE (linked to the logged model
    of ``model_sha256``, the model.pt that drew the images), the sample grid; tagged with what makes FIDs
    comparable (:func:`comparable`, against the statistics file ``reference``). Its id, or None: tracking off,
    or a server that does not answer."""
    if not cfg.enabled:
        return None
    name = evaluation_name(metrics)
    tags = {"stage": "evaluate", **{k: str(metrics[k]) for k in ("device", "precision") if k in metrics}}
    tags["comparable"] = comparable(metrics, file_hash(reference), clip_x0)
    artifacts = [grid] if grid is not None else []
    return log_child_run(cfg, parent_run_id, name, params, metrics, artifacts, tags, model_sha256)


def comparable(metrics: dict[str, Any], reference_sha256: str, clip_x0: bool) -> str:
    """What an FID is comparable on, as one string (the tag ``comparable`` of evaluations): the sampler and its
    settings (``clip_x0`` among them), the image count, and the reference statistics (the file's sha256, and its
    image count)."""
    kinds = {"steps": int, "order": int, "eta": float, "base_step_size": float}
    settings = {k: None if metrics.get(k) is None else kinds.get(k, str)(metrics[k]) for k in SETTING_KEYS}
    counts = {k: None if metrics.get(k) is None else int(metrics[k]) for k in COUNTS}
    made = {**settings, "clip_x0": bool(clip_x0), **counts, "reference_sha256": reference_sha256}
    return json.dumps(made, sort_keys=True)


def find_logged_model(client: Any, experiment_id: str, run_id: str | None, model_sha256: str) -> str | None:
    """The id of the newest complete logged model of the model.pt with this sha256, the training run's own first
    (None: none was logged, or its upload never finished: a store that was away when training ended)."""
    models = client.search_logged_models([experiment_id], filter_string=f"tags.model_sha256 = '{model_sha256}'")
    ready = [m for m in models if m.status.name == "READY"]
    mine = [m for m in ready if m.source_run_id == run_id] or ready
    return max(mine, key=lambda m: m.creation_timestamp).model_id if mine else None


def evaluation_name(metrics: dict[str, Any]) -> str:
    """``ddim-50steps-eta1.0-quad``, ``unipc-bh2-order2-10steps-quad``, ``adaptive-base2.0-eta1.0``: the sampler
    and the settings that apply to it."""
    s = metrics
    parts = [s["sampler"], s.get("variant"), s.get("order") and f"order{s['order']}"]
    parts += [s.get("steps") and f"{s['steps']}steps", s.get("base_step_size") and f"base{s['base_step_size']}"]
    parts += [f"eta{s['eta']}" if s.get("eta") is not None else None, s.get("spacing")]
    return "-".join(str(p) for p in parts if p)


COUNTS = ("num_samples", "reference_count")  # an FID is comparable only with FIDs at the same counts


def _sampling_row(child: Any) -> dict[str, Any]:
    """A child run's sampling config and results; settings that do not apply to its sampler stay empty."""
    p, m = child.data.params, child.data.metrics
    sampler = p.get("sample.sampler")
    used = SAMPLER_SETTINGS.get(sampler, ())

    def setting(key: str) -> Any:
        return p.get(f"sample.{key}") if key in used else None

    return {
        "sampler": sampler,
        **{key: setting(key) for key in ("steps", "spacing", "order", "variant")},
        "base_step": setting("base_step_size"),
        "eta": setting("eta"),
        **{k: int(m[k]) if m.get(k) is not None else None for k in COUNTS},
        "nfe": m.get("nfe"),
        "fid": m.get("fid"),
    }


def compare_runs(cfg: TrackingConfig) -> pd.DataFrame:
    """One row per (training run, sampling config): the DVC experiment (where one ran it), the params that
    differ between training runs, the final loss and MSE, and each child run's sampling settings, FID and NFE;
    sorted by FID (runs without one last).

    An evaluation repeated with the same sampling params and image counts shows once, with its newest FID.
    Tracking off: a :class:`UserError` that says so (there is no store to read).
    """
    import pandas as pd

    runs = _read_runs(cfg)
    if runs is None:
        return pd.DataFrame()
    parents = [r for r in runs if r.data.tags.get("stage") == "train"]
    children = sorted(
        (r for r in runs if r.data.tags.get("stage") == "evaluate"), key=lambda r: r.info.start_time, reverse=True
    )
    varying = sorted(
        k
        for k in {k for r in parents for k in r.data.params}
        if len({r.data.params.get(k) for r in parents}) > 1 and not k.startswith("paths.")
    )
    in_experiments = any("dvc.experiment" in r.data.tags for r in parents)
    rows = []
    for parent in parents:
        base = {
            "train_run": parent.info.run_id[:8],
            **({"experiment": parent.data.tags.get("dvc.experiment")} if in_experiments else {}),
            "status": parent.info.status,
            "final_loss": parent.data.metrics.get("loss"),
            "final_mse": parent.data.metrics.get("mse"),
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


def _read_runs(cfg: TrackingConfig) -> list[Any] | None:
    """Every run of the experiment (None: there is no such experiment); a store that cannot be read, or tracking
    off, is a :class:`UserError`."""
    if not cfg.enabled:
        raise UserError(f"{TRACKING_OFF}: no runs were recorded to compare; {TURN_ON} and rerun the stages")
    uri = tracking_uri(cfg)
    try:
        client = mlflow_client(uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        return None if experiment is None else client.search_runs([experiment.experiment_id], max_results=10_000)
    except Exception as e:  # a damaged database, a server that does not answer
        if server_answered(e):
            raise
        raise UserError(
            f"the MLflow store {uri} cannot be read ({first_line(e)}): repair or move it, or point tracking.uri "
            "elsewhere"
        ) from None
