"""Project-level contracts: `models/` stays pure, and the `ddim` entry point is installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
# models/ is pure PyTorch: no files, no logging, no orchestration, nothing from the stage code.
FORBIDDEN_IN_MODELS = {"tasks", "pipelines", "prefect", "mlflow", "dvc", "logging", "os", "pathlib", "shutil"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_are_pure(path):
    assert not imported_roots(path) & FORBIDDEN_IN_MODELS
    assert "cuda" not in path.read_text(), "no device names inside models/"


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("ddim ")
    assert main([]) == 0
    assert "usage: ddim" in capsys.readouterr().out


def test_console_script_is_installed():
    ddim = Path(sys.executable).with_name("ddim")
    out = subprocess.run([str(ddim), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ddim 0.")
