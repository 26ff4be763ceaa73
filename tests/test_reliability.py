"""Bad input through the real CLI: exit status 1, one `ddim <command>: error:` line that is the last on stderr,
no traceback, and no file changed. (The stages' own refusals are tested beside each stage: a foreign samples
folder, a folder that is not a prepared dataset, a killed stage's server, NaN weights and statistics.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

DDIM = str(Path(sys.executable).with_name("ddim"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fail(tmp_path: Path, *args: str) -> str:
    """Run ``ddim args`` in ``tmp_path``; check the failure's form and that nothing changed; its error line."""
    before = snapshot(tmp_path)
    out = subprocess.run(
        [DDIM, *args], capture_output=True, text=True, cwd=tmp_path, env=cli_env(tmp_path), timeout=120
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ddim {args[0]}: error: "), out.stderr
    assert snapshot(tmp_path) == before
    return last.split(": error: ", 1)[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text("evaluate:\n  reference_count: 16\n")
    return tmp_path


def test_a_params_file_that_is_not_utf8(project):
    (project / "params.yaml").write_bytes(b"sample:\n  steps: 10 # \xff\xfe\n")
    assert "params.yaml: not UTF-8 text (byte" in fail(project, "report")


def test_a_negative_reference_count(project):
    assert "evaluate.reference_count" in fail(project, "report", "--set", "evaluate.reference_count=-60")


def test_an_unknown_tracking_uri_scheme(project):
    assert "'foo://x' is not an MLflow tracking URI" in fail(project, "runs", "--set", "tracking.uri=foo://x")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"fid": 1.0}'])
def test_a_metrics_file_that_ddim_evaluate_did_not_write(project, content):
    (project / "results").mkdir()
    (project / "results" / "metrics.json").write_text(content)
    assert "is not a metrics file of ddim evaluate" in fail(project, "report")


def test_a_csv_path_that_cannot_be_written(project, tmp_path_factory):
    store = f"tracking.uri=sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    message = fail(project, "runs", "--set", store, "--csv", str(project / "missing" / "runs.csv"))
    assert str(project / "missing") in message  # pandas' own words: "Cannot save file into a non-existent directory"


def test_an_invalid_cron_schedule(project):
    assert fail(project, "serve", "--cron", "every night") == (
        "--cron 'every night' is not a cron schedule: five fields, e.g. '0 3 * * *'"
    )
