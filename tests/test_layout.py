"""Project-level contracts: `models/` stays pure, stages stay apart, dvc.yaml lists what each stage really
depends on, and the `ddim` entry point is installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser, main
from pipelines.stages import STAGES, markdown
from tasks.common.config import Params

ROOT = Path(__file__).resolve().parents[1]
# models/ is pure PyTorch: no files, no logging, no orchestration, nothing from the stage code.
FORBIDDEN_IN_MODELS = {"tasks", "pipelines", "prefect", "mlflow", "dvc", "logging", "os", "pathlib", "shutil"}


# Each DVC stage and the tasks/ module that does its work, from the table of stages.
STAGE_MODULES = {stage.dvc_name or stage.name: stage.module for stage in STAGES.values()}
# The `ddim` commands that are no stage but do work of their own: each in tasks/<command>.py too.
COMMAND_MODULES = {
    "import-model": "tasks/import_model.py",
    "export-model": "tasks/export_model.py",
    "register": "tasks/register.py",
}
LONGEST_FUNCTION = 60  # lines, in tasks/ and pipelines/


def test_the_top_of_tasks_is_the_list_of_stages_and_commands():
    names = {(ROOT / m).name for m in [*STAGE_MODULES.values(), *COMMAND_MODULES.values()]}
    assert {p.name for p in (ROOT / "tasks").glob("*.py")} == names | {"__init__.py"}
    for name, module in {**STAGE_MODULES, **COMMAND_MODULES}.items():
        assert module == f"tasks/{name.replace('-', '_')}.py", "a stage's module is named as the stage"


def test_the_table_of_stages_is_the_cli_and_the_readme():
    commands = {a.dest: a for a in build_parser()._actions if a.dest == "command"}["command"].choices
    assert set(STAGES) | set(COMMAND_MODULES) <= set(commands)
    assert markdown() in (ROOT / "README.md").read_text(), "README: paste the output of `make stages`"


def function_lengths(folder: str) -> dict[str, int]:
    lengths = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lengths[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


@pytest.mark.parametrize("folder", ["tasks", "pipelines"])
def test_every_function_fits_on_a_screen(folder):
    assert {name: n for name, n in function_lengths(folder).items() if n > LONGEST_FUNCTION} == {}


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
    others = {*STAGE_MODULES.values(), *COMMAND_MODULES.values()} - {STAGE_MODULES[stage]}
    assert set(dvc_stages()) == set(STAGE_MODULES)
    assert not code_closure(STAGE_MODULES[stage]) & others


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_each_stage_lists_every_code_file_it_runs(stage):
    listed = {d for d in dvc_stages()[stage]["deps"] if d.endswith(".py")}
    assert listed == code_closure(STAGE_MODULES[stage])


def runtime_keys() -> set[str]:
    """Every ``section.key`` made with ``runtime(...)``: what changes how a stage runs, never what it writes."""
    return {
        f"{section}.{key}"
        for section, info in Params.model_fields.items()
        for key in set(info.annotation.model_fields) - set(info.annotation.result_keys())
    }


def test_each_stage_lists_exactly_the_params_that_can_change_what_it_writes():
    """Each key of tasks/common/config.py names the stages it can change (``result(..., stages=...)``); dvc.yaml's
    ``params:`` lists are exactly those, in params.yaml's order, so they read as generated."""
    from tasks.common.config import STAGES, stage_params

    assert tuple(STAGE_MODULES) == STAGES, "config's stage names are the table's"
    listed = {name: stage.get("params", []) for name, stage in dvc_stages().items()}
    assert listed == {stage: stage_params(stage) for stage in STAGES}, "dvc.yaml's params: lists are stage_params()"
    runtime = runtime_keys()
    assert {"train.log_every", "train.num_workers", "train.device", "sample.device", "evaluate.device"} <= runtime
    assert not runtime & {key for keys in listed.values() for key in keys}


def test_dvc_ignores_the_lock_files_beside_stage_outputs():
    """A lock file names the process that held it; in a folder some stage depends on (data/prepared for the
    latent stages) it would make every run look like a changed dependency."""
    from tasks.common.files import lock_path

    lock = lock_path(Path("data/prepared/shapes16"))
    out = subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), "check-ignore", str(lock)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.strip() == str(lock), out.stderr
