"""Project-level contracts: `models/` stays pure, stages stay apart, dvc.yaml lists what each stage really
depends on, and the `ddim` entry point is installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from tasks.config import Params

ROOT = Path(__file__).resolve().parents[1]
# models/ is pure PyTorch: no files, no logging, no orchestration, nothing from the stage code.
FORBIDDEN_IN_MODELS = {"tasks", "pipelines", "prefect", "mlflow", "dvc", "logging", "os", "pathlib", "shutil"}


# Each DVC stage and the tasks/ module that does its work.
STAGE_MODULES = {
    "prepare": "tasks/data.py",
    "reference": "tasks/reference.py",
    "train": "tasks/train.py",
    "sample": "tasks/sample.py",
    "evaluate": "tasks/evaluate.py",
    "sweep": "tasks/sweep.py",
    "sweep-table": "tasks/sweep.py",  # the sweep's cells and its table: one module
    "reconstruct": "tasks/reconstruct.py",
    "interpolate": "tasks/interpolate.py",
}


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


@pytest.mark.integration
def test_console_script_is_installed():
    ddim = Path(sys.executable).with_name("ddim")
    out = subprocess.run([str(ddim), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ddim 0.")


def project_imports(path: Path) -> set[str]:
    """The files of tasks/ and models/ that ``path`` imports directly (as paths relative to the root)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            file = f"{name.replace('.', '/')}.py"
            if name.split(".")[0] in ("tasks", "models") and (ROOT / file).is_file():
                found.add(file)
    return found


def code_closure(start: str) -> set[str]:
    """``start`` and every tasks/ or models/ file it imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo += project_imports(ROOT / file)
    return seen


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_no_stage_module_imports_another(stage):
    others = set(STAGE_MODULES.values()) - {STAGE_MODULES[stage]}
    assert set(dvc_stages()) == set(STAGE_MODULES)
    assert not code_closure(STAGE_MODULES[stage]) & others


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_each_stage_lists_every_code_file_it_runs(stage):
    listed = {d for d in dvc_stages()[stage]["deps"] if d.endswith(".py")}
    assert listed == code_closure(STAGE_MODULES[stage])


def result_keys(*sections: str) -> list[str]:
    return [f"{s}.{k}" for s in sections for k in Params.model_fields[s].annotation.result_keys()]


def test_each_stage_lists_exactly_the_params_that_can_change_what_it_writes():
    cell_keys = [k for k in result_keys("sweep") if k not in ("sweep.steps", "sweep.eta")]
    latent = result_keys("latent")  # dataset, num_images, steps, spacing, clip_x0 | pairs, ..., seed
    assert latent[:5] == [f"latent.{k}" for k in ("dataset", "num_images", "steps", "spacing", "clip_x0")]
    expected = {
        "prepare": result_keys("data"),
        "reference": ["evaluate.reference_count"],
        "train": ["data.image_size", *result_keys("model", "diffusion", "train")],
        "sample": result_keys("diffusion", "sample"),
        "evaluate": [],  # it reads how the images were made from the samples folder itself
        # A cell's own steps and eta are in its command, so adding a value to the grid reruns no other cell.
        "sweep": [
            *result_keys("diffusion"),
            "sample.clip_x0",
            "sample.seed",
            "sample.precision",
            "sample.compile",
            *cell_keys,
        ],
        "sweep-table": ["data.source", "data.split", "data.count", *result_keys("sweep")],
        "reconstruct": ["data.name", *result_keys("diffusion"), "sample.precision", "sample.compile", *latent[:5]],
        "interpolate": [
            "data.name",
            *result_keys("diffusion"),
            "sample.precision",
            "sample.compile",
            "latent.dataset",
            *latent[3:],
        ],
    }
    listed = {name: stage.get("params", []) for name, stage in dvc_stages().items()}
    assert listed == expected
    runtime = {"train.log_every", "train.num_workers", "train.device", "sample.device", "evaluate.device"}
    assert not runtime & {key for keys in listed.values() for key in keys}


def test_dvc_ignores_the_lock_files_beside_stage_outputs():
    """A lock file names the process that held it; in a folder some stage depends on (data/prepared for the
    latent stages) it would make every run look like a changed dependency."""
    from tasks.files import lock_path

    lock = lock_path(Path("data/prepared/shapes16"))
    out = subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), "check-ignore", str(lock)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.strip() == str(lock), out.stderr
