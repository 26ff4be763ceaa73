"""Test-session setup: Prefect runs against a throwaway home and a local test server, never the user's."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
from helpers import PREFECT_HOME

# Before anything imports prefect: keep its database and settings out of the user's ~/.prefect (plain helpers,
# such as cli_env and free_port, are in helpers.py; this file holds the fixtures).
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for the session: creating a database costs ~1.5 s of migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def prefect_server():
    """One local Prefect server for every flow test of the session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def make_project(tmp_path, monkeypatch):
    """``make_project(params)``: ``params`` as tmp_path/params.yaml, its dataset prepared, tmp_path the current
    directory (so its MLflow store is its own); returns tmp_path."""
    import yaml

    from tasks.common.config import load_params
    from tasks.prepare import build_dataset

    def make(params: dict) -> Path:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.chdir(tmp_path)
        loaded = load_params("params.yaml")
        build_dataset(loaded.data, loaded.paths)
        return tmp_path

    return make


class Served:
    """A local HTTP server's folder and URL (``root, url = served``), and the paths it was asked for."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url, self.requests = root, url, []

    def __iter__(self):
        return iter((self.root, self.url))


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1 for the duration of a test."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served = Served(root, f"http://127.0.0.1:{server.server_address[1]}")
    served.requests = requests
    yield served
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps, once per test module; returns its params file (samples/metrics
    paths inside tmp)."""
    import yaml
    from helpers import setup_run

    from tasks import train
    from tasks.common.config import load_params

    root = tmp_path_factory.mktemp("trained")
    params_file = setup_run(root, f"sqlite:///{root / 'mlflow.db'}", steps=6, deterministic=False)
    raw = yaml.safe_load(params_file.read_text())
    raw["paths"].update(reference=str(root / "ref"), samples=str(root / "samples"), metrics=str(root / "metrics.json"))
    raw["sample"] = {"num_samples": 8, "batch_size": 8, "steps": 5, "spacing": "trailing"}
    raw["evaluate"] = {"reference_count": 16, "batch_size": 16, "num_workers": 0}
    params_file.write_text(yaml.safe_dump(raw))
    train.run(load_params(params_file))
    return params_file
