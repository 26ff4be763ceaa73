"""The Prefect API that one `ddim` command reports to: ``PREFECT_API_URL`` if set, else the project's UI
server if ``make ui`` is running (:func:`running_ui_api`), else a temporary server.

Prefect's own temporary server (its "ephemeral mode") is a child process in the command's process group, so
a signal to the group (Ctrl-C, or DVC or a Prefect worker stopping the command) kills it together with the
stage, and the stage can no longer report how it ended: it hangs in retries or crashes instead of stopping
cleanly. If the command itself is killed outright, that server outlives it, forever.

:class:`TemporaryServer` starts the same server (uvicorn on 127.0.0.1, no UI) in a session of its own, so group
signals leave it to the command, and asks the kernel to stop it when the command's process dies, however it
dies (Linux's ``PR_SET_PDEATHSIG``; elsewhere Prefect's own mode is used). The command stops it as it exits.
Commands started inside (``dvc repro`` running the stages) inherit ``PREFECT_API_URL`` and share the server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.common.errors import UserError

PR_SET_PDEATHSIG = 1


class PrefectServerError(UserError):
    """The temporary Prefect server would not start."""


UI_API_FILE = Path(".ui") / "prefect.url"  # written by `make ui`, removed by `make ui-stop`


def running_ui_api() -> str | None:
    """The API URL of the Prefect server that ``make ui`` started in this folder, if it answers."""
    try:
        url = UI_API_FILE.read_text().strip()
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError):  # no UI started here, or it has stopped
        return None


def use_api(url: str) -> None:
    """Point Prefect, and every command started from here, at ``url``. Prefect reads ``PREFECT_API_URL`` once,
    when it is first imported: this fails loudly if it is already imported (it would report elsewhere)."""
    if "prefect" in sys.modules:
        raise RuntimeError(f"Prefect was imported before its API URL ({url}) was set: import pipelines.flows later")
    os.environ["PREFECT_API_URL"] = url  # children inherit it


def _own_session_tied_to_parent(parent: int) -> None:
    """In the child, before exec: a new session, and SIGTERM when the parent dies."""
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    parent = os.getpid()
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: _own_session_tied_to_parent(parent),
    )


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            if response.status == 200:
                return True
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class TemporaryServer:
    """The temporary server of one command: :meth:`launch` starts it without waiting, so that it boots while
    the command imports and validates; :meth:`wait` blocks until it answers."""

    def __init__(self) -> None:
        self.process, self.url = self._spawn()

    @staticmethod
    def _spawn() -> tuple[subprocess.Popen, str]:
        port = _free_port()
        process = _start_server(port)
        atexit.register(_stop, process)  # at exit, after Prefect's own handlers (registered later) have run
        url = f"http://127.0.0.1:{port}/api"
        use_api(url)
        return process, url

    @classmethod
    def launch(cls) -> TemporaryServer | None:
        """Start the server unless ``PREFECT_API_URL`` names one, ``make ui``'s server answers here (it then
        becomes ``PREFECT_API_URL``), or this is not Linux (Prefect's own mode)."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        if ui_api := running_ui_api():
            use_api(ui_api)  # report where the UI shows the runs
            return None
        return cls() if sys.platform.startswith("linux") else None

    def wait(self) -> str:
        """The server's API URL once it answers; call before Prefect is imported."""
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 20))
        for _ in range(3):  # another process may take the free port before the server binds it: try another,
            if _wait_healthy(self.process, self.url, timeout):  # unless Prefect has read this one already
                return self.url
            _stop(self.process)
            if "prefect" in sys.modules:
                break
            self.process, self.url = self._spawn()
        raise PrefectServerError(
            f"the temporary Prefect server did not start in {timeout:g} s: raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a running server (make ui)"
        )


def drain_reports(timeout: float = 10.0) -> None:
    """Send what Prefect still has queued (logs, events) now, if Prefect is in use: its exit handlers would
    otherwise do it, and print about it, after the command's last line."""
    if "prefect.events.worker" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # a worker that never started, or a server already gone
            worker.drain_all(timeout=timeout)
