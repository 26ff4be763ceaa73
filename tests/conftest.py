"""Test-session setup: Prefect runs against a throwaway home and a local test server, never the user's."""

from __future__ import annotations

import os
import tempfile

import pytest

# Before anything imports prefect: keep its database and settings out of the user's ~/.prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="ddim-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_server():
    """One local Prefect server for every flow test of the session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def cli_env(tmp_path) -> dict[str, str]:
    """Environment for running `ddim` in a subprocess: its own Prefect home, no API URL."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env
