"""Training outlives its tracking servers: a real MLflow server and a real Prefect server, started on 127.0.0.1
and killed by the test in the middle of `ddim train`. The stage keeps training, its metrics keep going to the
CSV, MLflow catches up when its server answers again, and the stage ends with its outputs complete, a warning
that names what was not recorded, and exit status 0."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from helpers import cli_env, free_port

from tasks.common.config import TrackingConfig, load_params
from tasks.common.tracking import (
    NullTracker,
    Outbox,
    Tracker,
    TrackingWarning,
    log_child_run,
    server_answered,
    summarise,
)

BIN = Path(sys.executable).parent
PROJECT = {
    "data": {"source": "shapes", "name": "s", "count": 32, "image_size": 16},
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
    "train": {"steps": 300, "batch_size": 8, "log_every": 5, "sample_every": 0, "checkpoint_every": 100,
              "num_workers": 0},
    "tracking": {"flush_timeout": 5},
}  # fmt: skip


class Server:
    """A server process in a session of its own (killed as a group), answering at ``health``."""

    def __init__(self, command: list[str], health: str, env: dict[str, str] | None = None) -> None:
        self.command, self.health, self.env = command, health, env
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.health, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"{self.command[0]} did not answer in {timeout} s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def project(make_project) -> Path:
    return make_project(PROJECT)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--default-artifact-root", str(store / "art")]
    server = Server(command, f"http://127.0.0.1:{port}/health")
    server.uri = f"http://127.0.0.1:{port}"
    server.start()
    yield server
    server.kill()


def rows(project: Path) -> int:
    path = project / "results" / "train" / "train_metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return len(list(csv.DictReader(f)))


def wait_for_rows(project: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while rows(project) < count:
        assert process.poll() is None, "training ended early"
        assert time.monotonic() < deadline, f"training stalled at {rows(project)} metric rows"
        time.sleep(0.1)


def ddim_train(project: Path, *sets: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(
        [str(BIN / "ddim"), "train", *args], cwd=project, env=env or cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.integration
def test_training_outlives_its_mlflow_server_and_catches_up_when_it_returns(project, mlflow_server):
    from mlflow.tracking import MlflowClient

    uri = f"tracking.uri={mlflow_server.uri}"
    proc = ddim_train(project, uri)
    wait_for_rows(project, 10, proc)
    mlflow_server.kill()
    now = rows(project)
    wait_for_rows(project, now + 10, proc, timeout=60)  # 50 more steps while the server is away: no stall
    mlflow_server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "answers again: caught up" in err
    assert "not recorded" not in err
    run_id = json.loads(out.strip().splitlines()[-1])["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(5, 301, 5))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "model.pt" in {a.path for a in client.list_artifacts(run_id)}

    # The same run continued to 450 steps, and this time the server does not come back.
    proc = ddim_train(project, uri, "train.steps=450")
    wait_for_rows(project, 65, proc)
    mlflow_server.kill()
    started = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - started < 120, "the stage waited for the server"
    assert rows(project) == 90 and (project / "results" / "train" / "model.pt").is_file()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 450 and summary["mlflow_run_id"] == run_id
    (warning,) = [line for line in err.splitlines() if line.startswith("warning: MLflow at")]
    assert f"{mlflow_server.uri} is unavailable" in warning
    assert "not recorded: metrics at" in warning and "... 450; they are in the CSV)" in warning
    assert "artifact model.pt" in warning and "the run's end (FINISHED)" in warning and run_id in warning


@pytest.mark.integration
def test_training_outlives_its_prefect_server(project, tmp_path):
    port = free_port()
    env = {**cli_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = Server(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}/api/health",
        env,
    )
    prefect.start()
    try:
        proc = ddim_train(project, "train.steps=300", env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
        wait_for_rows(project, 10, proc)
        prefect.kill()
        out, err = proc.communicate(timeout=300)
    finally:
        prefect.kill()
    assert proc.returncode == 0, err[-3000:]
    assert f"warning: the Prefect API at http://127.0.0.1:{port}/api stopped answering" in err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 300
    assert rows(project) == 60 and (project / "results" / "train" / "model.pt").is_file()


def test_the_outbox_sends_in_order_retries_what_got_no_answer_and_names_what_it_could_not_send():
    from mlflow.exceptions import RestException

    sent, failures = [], {"b": 2}

    def call(name: str):
        def send() -> None:
            if failures.get(name, 0) > 0:
                failures[name] -= 1
                raise ConnectionError("no answer")
            if name == "refused":
                raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad value"})
            sent.append(name)

        return send

    outbox = Outbox("http://nowhere")
    for name in ("a", "b", "refused", "c"):
        outbox.put(name, call(name))
    missed = outbox.close(timeout=30)
    assert missed == ["refused (refused: RestException: INVALID_PARAMETER_VALUE: bad value)"]
    assert sent == ["a", "b", "c"]
    assert summarise([*missed, "metrics at step 5", "metrics at step 10", "metrics at step 7 (refused: X)"]) == (
        "metrics at 2 steps (5 ... 10; they are in the CSV), refused (refused: RestException: "
        "INVALID_PARAMETER_VALUE: bad value), metrics at step 7 (refused: X)"
    )

    stuck = Outbox("http://nowhere")
    failures["d"] = 10**6
    stuck.put("d", call("d"))
    stuck.put("e", call("e"))
    started = time.monotonic()
    assert stuck.close(timeout=1) == ["d", "e"] and time.monotonic() - started < 5


def test_a_server_that_does_not_answer_at_the_start_leaves_the_run_untracked_with_a_warning(tmp_path):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.warns(TrackingWarning, match=r"is unavailable .*: not recorded: this whole run"):
        tracker = Tracker.for_training(cfg, {"a": 1}, {}, tmp_path)
    assert type(tracker) is NullTracker
    with pytest.warns(TrackingWarning, match=r"not recorded: the run fid-10 \(fid=12.5\)"):
        assert log_child_run(cfg, None, "fid-10", {}, {"fid": 12.5}) is None
    assert time.monotonic() - started < 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NullTracker().finish("FINISHED", 0)


def test_what_counts_as_an_answer_of_the_store():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_STATE, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    assert server_answered(MlflowException("Run 'x' not found", RESOURCE_DOES_NOT_EXIST))
    assert server_answered(MlflowException("The run is deleted", INVALID_STATE))
    assert not server_answered(MlflowException("API request to http://x failed with exception ConnectionError"))
    assert not server_answered(MlflowException("503", TEMPORARILY_UNAVAILABLE))
    assert not server_answered(ConnectionRefusedError())


def test_a_resumed_run_whose_mlflow_run_is_gone_starts_a_new_tracked_run(project):
    """The sqlite store was deleted (or tracking.uri changed) between two runs of a recipe: its stored run id
    names no run there, which is the store's answer, not an outage: a new run is tracked."""
    from tasks import train

    first = train.run(load_params("params.yaml", ["train.steps=4", "train.checkpoint_every=2"]))
    other = f"tracking.uri=sqlite:///{project / 'other.db'}"  # a new store (in one process: a deleted one stays open)
    again = train.run(load_params("params.yaml", ["train.steps=6", "train.checkpoint_every=2", other]))
    assert again["resumed_from"] == 4 and again["mlflow_run_id"] not in (None, first["mlflow_run_id"])


def test_a_child_run_of_a_training_run_the_store_no_longer_holds_is_a_run_of_its_own(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'new.db'}", experiment="e")
    run_id = log_child_run(cfg, "0123456789abcdef0123456789abcdef", "fid-10", {}, {"fid": 12.5})
    run = MlflowClient(tracking_uri=cfg.uri).get_run(run_id)
    assert run.data.metrics["fid"] == 12.5 and "mlflow.parentRunId" not in run.data.tags
