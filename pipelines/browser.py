"""The UIs as a user sees them: headless Chromium renders the Prefect runs page, the MLflow experiment page and
the MLflow registered model's page.

``render`` returns a page's DOM after its scripts have run (what ``chromium --dump-dom`` prints) and can save
a screenshot. ``python -m pipelines.browser`` (``make screenshots``, with ``make ui`` running, after ``make demo``)
writes the three pages' screenshots for the README. The browser runs with a throwaway profile and is gone when a
call returns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from tasks.common.files import atomic_path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SIZE = (1440, 900)
DOM_HEIGHT = 4000
# MLflow 3.17's UI opens experiments in its GenAI view (traces) unless told otherwise: this query selects its
# "Model training" view, the runs table (a choice the UI then keeps while one navigates).
MLFLOW_TRAINING_VIEW = "?workflowType=machine_learning"
SCRIPT_MS = 20_000  # virtual time for the page's scripts; it stands still while a request is pending


class BrowserError(RuntimeError):
    """Chromium is missing or could not render a page."""


def find_chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def render(url: str, screenshot: Path | None = None, size: tuple[int, int] = SIZE, timeout: float = 120) -> str:
    """The DOM of ``url`` once its scripts have run; with ``screenshot``, also a PNG of the window."""
    chromium = find_chromium()
    if chromium is None:
        raise BrowserError("Chromium not found: install it (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="ddim-chromium-") as profile:
        base = [
            chromium,
            "--headless",
            "--no-sandbox",  # Chromium's sandbox refuses to start as root (containers, CI)
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={SCRIPT_MS}",
        ]
        # The DOM from a tall window: the UIs' lists create only the rows that fit in it.
        dom = _chromium([*base, f"--window-size={size[0]},{DOM_HEIGHT}", "--dump-dom", url], timeout).stdout
        if screenshot is not None:
            shot = Path(profile) / "screenshot.png"  # Chromium picks the format by the name's extension
            _chromium([*base, f"--window-size={size[0]},{size[1]}", f"--screenshot={shot}", url], timeout)
            if not shot.is_file() or shot.stat().st_size == 0:
                raise BrowserError(f"Chromium wrote no screenshot of {url}")
            with atomic_path(screenshot) as tmp:
                shutil.copyfile(shot, tmp)
    return dom


def _chromium(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BrowserError(f"Chromium did not finish {cmd[-1]} in {timeout:.0f} s") from None
    if out.returncode != 0:
        raise BrowserError(f"Chromium failed on {cmd[-1]} (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    return out


def answering(url: str) -> None:
    """Raise unless ``url`` answers: Chromium would render a browser error page, and save a picture of it."""
    try:
        with urllib.request.urlopen(url, timeout=10):
            pass
    except OSError as e:
        raise BrowserError(f"nothing answers at {url} ({e}): start the UIs with `make ui` (on these ports)") from None


def prefect_runs_url(prefect: str) -> str:
    return f"{prefect.rstrip('/')}/runs"


def mlflow_experiment_url(mlflow: str, experiment: str) -> str:
    """The MLflow UI's page of ``experiment`` (its id read from the tracking server's REST API)."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    api = f"{mlflow.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    try:
        with urllib.request.urlopen(api, timeout=30) as response:
            experiment_id = json.loads(response.read())["experiment"]["experiment_id"]
    except OSError as e:
        raise BrowserError(f"no experiment {experiment!r} at {mlflow} ({e}): run `make demo` first") from None
    return f"{mlflow.rstrip('/')}/#/experiments/{experiment_id}{MLFLOW_TRAINING_VIEW}"


def mlflow_registered_model_url(mlflow: str, name: str) -> str:
    """The MLflow UI's page of registered model ``name`` (its versions and aliases), which must exist."""
    api = f"{mlflow.rstrip('/')}/api/2.0/mlflow/registered-models/get?{urllib.parse.urlencode({'name': name})}"
    try:
        with urllib.request.urlopen(api, timeout=30):
            pass
    except OSError as e:
        raise BrowserError(f"no registered model {name!r} at {mlflow} ({e}): run `ddim register` first") from None
    return f"{mlflow.rstrip('/')}/#/models/{urllib.parse.quote(name)}"


def registered_model_name(params_file: Path) -> str:
    """``tracking.registered_model`` of the params, as ``ddim register`` names it."""
    from tasks.common.config import load_params

    params = load_params(params_file)
    return params.tracking.registered_model or f"ddim-{params.data.name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.browser", description=__doc__.splitlines()[0])
    parser.add_argument("--prefect", default="http://127.0.0.1:4200", help="the Prefect UI (make ui)")
    parser.add_argument("--mlflow", default="http://127.0.0.1:5000", help="the MLflow UI (make ui)")
    parser.add_argument("--experiment", default="ddim", help="the MLflow experiment (tracking.experiment)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="names the registered model")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the screenshots go")
    args = parser.parse_args(argv)
    try:
        for server, health in ((args.prefect, "/api/health"), (args.mlflow, "/health")):
            answering(server.rstrip("/") + health)
        pages = {
            "ui-prefect-runs.png": prefect_runs_url(args.prefect),
            "ui-mlflow-runs.png": mlflow_experiment_url(args.mlflow, args.experiment),
            "ui-mlflow-registry.png": mlflow_registered_model_url(args.mlflow, registered_model_name(args.params)),
        }
        for name, url in pages.items():
            render(url, args.out / name)
            print(f"{args.out / name}  ({url})")
    except BrowserError as e:
        print(f"ddim screenshots: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
