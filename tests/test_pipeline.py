"""The whole pipeline with the real tools: dvc repro of a micro profile in a fresh git repository."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import SMALL, free_port
from PIL import Image

from tasks.common.config import load_params, profile_params

pytestmark = pytest.mark.integration  # DVC, Prefect servers and subprocesses

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = [
    "models",
    "tasks",
    "pipelines",
    "dvc.yaml",
    "params.yaml",
    "prefect.yaml",
    "Makefile",
    "pyproject.toml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
]

MICRO = {
    "data": {"count": 64, "image_size": 16},
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
    "train": {
        "steps": 4,
        "batch_size": 16,
        "log_every": 2,
        "sample_every": 0,
        "sample_steps": 3,
        "checkpoint_every": 2,
    },
    "sample": {"num_samples": 8, "batch_size": 8, "steps": 3},
    "evaluate": {"reference_count": 16, "batch_size": 16},
    "sweep": {"steps": [2], "eta": [0.0], "solvers": ["dpm-solver++-order2"], "num_samples": 4, "batch_size": 4},
    "latent": {"num_images": 4, "steps": [2, 4], "pairs": 2, "frames": 3, "interpolate_steps": 2},
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def ran_stages(output: str) -> list[str]:
    """The stages DVC ran, in order, from its output (also when streamed into a flow's log lines)."""
    return re.findall(r"Running stage '([^']+)'", output)


GIT_USER = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def repo_env(repo: Path) -> dict[str, str]:
    """The environment of a command run in ``repo``: its own code, Prefect home and working directory."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(repo / ".prefect-home"),
        "PYTHONPATH": str(repo),
        "PWD": str(repo),
        **GIT_USER,
    }
    env.pop("PREFECT_API_URL", None)
    return env


def replace_in_sqlite(db: Path, old: str, new: str) -> None:
    """``old`` replaced by ``new`` in every text of the database (MLflow's artifact locations, say)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in conn.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], column[2].upper()
                if kind == "" or any(t in kind for t in ("CHAR", "TEXT", "CLOB", "JSON")):
                    conn.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) WHERE instr("{name}", ?) > 0',
                        (old, new, old),
                    )


def copy_repo(src: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the micro repository ``src`` at ``dst``, with what named ``src`` by its absolute path pointed at
    ``dst`` (params.yaml's tracking URI, committed, and the MLflow and Prefect databases); returns it with its
    environment. Its ``.venv`` stays the link to the project's venv."""
    shutil.copytree(src, dst, symlinks=True)  # copy2: the mtimes too (DVC and make compare them)
    env = repo_env(dst)
    params = dst / "params.yaml"
    params.write_text(params.read_text().replace(str(src), str(dst)))
    run(["git", "commit", "-qm", "the copy's own tracking store", "params.yaml"], dst, env)
    for db in [dst / "mlflow.db", *(dst / ".prefect-home").glob("*.db")]:
        if db.exists():
            replace_in_sqlite(db, str(src), str(dst))
    return dst, env


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Path:
    """A git repository holding the project with params.yaml shrunk to the micro profile, nothing run yet."""
    repo = tmp_path_factory.mktemp("micro") / "repo"
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)  # keeps mtimes: the venv's install stamp stays newer than pyproject.toml
    # `make` targets use the project's own venv (installed already: `make test` ran `make setup`).
    (repo / ".venv").symlink_to(BIN.parent)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in MICRO.items():
        params[section].update(values)
    params["tracking"]["uri"] = f"sqlite:///{repo / 'mlflow.db'}"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = repo_env(repo)
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "/.prefect-home/\n/.venv\n")
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "micro"], repo, env)
    return repo


@dataclasses.dataclass
class Demo:
    path: Path  # the repository after `make demo`, its dvc.lock committed: every test here starts from a copy
    output: str  # what that first `make demo` printed


@pytest.fixture(scope="session")
def demo(micro, tmp_path_factory) -> Demo:
    """The micro repository after `make demo` (the pipeline run once per session, from nothing), committed."""
    path, env = copy_repo(micro, tmp_path_factory.mktemp("demo") / "repo")
    first = run(["make", "demo"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "make demo"], path, env)
    return Demo(path, first.stdout)


@pytest.fixture
def repo(demo, tmp_path) -> tuple[Path, dict[str, str]]:
    """The test's own copy of the repository after `make demo`, and its environment: the test may change it."""
    return copy_repo(demo.path, tmp_path / "repo")


@pytest.fixture
def served_repo(prefect_server, repo):
    """The test's repository, with PREFECT_API_URL pointing its commands at the session's test server."""
    from prefect.settings import PREFECT_API_URL

    path, env = repo
    return path, {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}


def test_make_demo_runs_everything_then_only_what_changed(demo, repo):
    first = demo.output  # `make demo` in the repository as cloned, nothing run yet; the rest in this test's copy
    assert ran_stages(first) == ["prepare", "reference", "train", "sample", "evaluate"]
    path, env = repo
    report = first[first.index("FID ") :]
    assert "biased" in report and "results/samples/grid.png" in report and "make ui" in report
    assert "registered ddim-shapes16 version 1 as @champion: model m-" in report, "the demo's model is registered"
    run_id = (path / "results" / "train" / "mlflow_run_id").read_text().strip()
    assert f"MLflow run:     {run_id}" in report
    status = run([str(BIN / "dvc"), "status", "evaluate"], path, env)
    assert "up to date" in status.stdout

    again = run(["make", "demo"], path, env)
    assert ran_stages(again.stdout) == [] and "FID " in again.stdout
    again = run([str(BIN / "dvc"), "repro", "evaluate"], path, env)
    assert ran_stages(again.stdout) == []

    metrics = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], path, env).stdout)
    values = next(iter(metrics.values()))["data"]["results/metrics.json"]["data"]
    assert values["num_samples"] == 8 and values["fid"] > 0 and values["steps"] == 3

    params = yaml.safe_load((path / "params.yaml").read_text())
    params["sample"]["steps"] = 4
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run([str(BIN / "dvc"), "repro", "evaluate"], path, env)
    assert ran_stages(changed.stdout) == ["sample", "evaluate"]

    assert "fid" in run([str(BIN / "ddim"), "runs"], path, env).stdout
    run([str(BIN / "ddim"), "runs", "--csv", "runs.csv"], path, env)
    table = (path / "runs.csv").read_text().strip().splitlines()
    assert len(table) == 3, "a header, then one row per sampling config of the one trained model"
    assert "fid" in table[0].split(",")


def test_a_fresh_run_that_makes_the_same_results_leaves_dvc_lock_as_it_was(repo):
    """dvc.lock records results only: a new MLflow run, other timings and fresh checkpoints change nothing."""
    path, env = repo
    lock = (path / "dvc.lock").read_text()
    old_run = (path / "results" / "train" / "mlflow_run_id").read_text()
    shutil.rmtree(path / "results")  # every file train, sample and evaluate wrote, and the checkpoints
    shutil.rmtree(path / "data" / "checkpoints")
    # Run them again (as in a fresh clone) rather than restore model.pt from DVC's cache.
    again = run([str(BIN / "dvc"), "repro", "--force", "--single-item", "train", "sample", "evaluate"], path, env)
    assert ran_stages(again.stdout) == ["train", "sample", "evaluate"], again.stdout[-3000:]
    assert (path / "results" / "train" / "mlflow_run_id").read_text() != old_run, "a new training run"
    assert (path / "dvc.lock").read_text() == lock


def test_what_cannot_change_a_result_reruns_nothing_downstream(served_repo):
    path, env = served_repo
    dvc = str(BIN / "dvc")
    model_pt = path / "results" / "train" / "model.pt"
    model_bytes = model_pt.read_bytes()
    # Keys that only change how a stage runs are no stage's DVC params: nothing reruns.
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["train"]["log_every"] = 1
    params["train"]["num_workers"] = 1
    params["sample"]["device"] = "cpu"
    params["evaluate"]["num_workers"] = 1
    params["tracking"]["experiment"] = "elsewhere"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run([dvc, "repro", "evaluate"], path, env).stdout) == []

    # Code that only training runs: train reruns, resumes at its last step and writes the same model.pt,
    # so neither sampling nor the FID is redone.
    train_py = path / "tasks" / "train.py"
    train_py.write_text(train_py.read_text() + "# an edit that changes no result\n")
    assert ran_stages(run([dvc, "repro", "evaluate"], path, env).stdout) == ["train"]
    assert model_pt.read_bytes() == model_bytes
    assert "up to date" in run([dvc, "status", "evaluate"], path, env).stdout


def test_ddim_sweep_runs_one_stage_per_cell_and_only_new_cells_later(served_repo):
    """Two samplers through DVC: DDIM's cell and DPM-Solver++'s, then only the cells a new step count and a new
    solver add."""
    path, env = served_repo
    out = run([str(BIN / "ddim"), "sweep"], path, env)
    ran = [s for s in ran_stages(out.stdout + out.stderr) if s.startswith("sweep")]
    assert sorted(ran[:-1]) == ["sweep-solver@dpm-solver++-order2-2", "sweep@2-0.0"] and ran[-1] == "sweep-table"
    table = (path / "results" / "sweep" / "table.csv").read_text().splitlines()
    assert table[0].startswith("sampler,steps,eta,order,variant,spacing,nfe,fid") and len(table) == 3
    assert [row.split(",")[:5] for row in table[1:]] == [
        ["ddim", "2", "0.0", "", ""],
        ["dpm-solver++", "2", "", "2", ""],
    ]
    assert json.loads(out.stdout.splitlines()[-1])["cells"] == 2

    grid = ["--set", "sweep.steps=[2,3]", "--set", "sweep.solvers=[dpm-solver++-order2,unipc-bh2-order2]"]
    out = run([str(BIN / "ddim"), "sweep", *grid], path, env)
    ran = [s for s in ran_stages(out.stdout + out.stderr) if s.startswith("sweep")]
    new = ["sweep-solver@dpm-solver++-order2-3", "sweep-solver@unipc-bh2-order2-2", "sweep-solver@unipc-bh2-order2-3"]
    assert sorted(ran[:-1]) == sorted([*new, "sweep@3-0.0"]), "the cells already there are up to date"
    table = (path / "results" / "sweep" / "table.csv").read_text().splitlines()
    assert len(table) == 7 and sum(row.startswith("unipc,") for row in table) == 2


def test_ddim_reconstruct_and_interpolate_are_dvc_stages(served_repo):
    """The README's `ddim reconstruct` and `ddim interpolate`, as DVC runs them; a second repro runs nothing."""
    path, env = served_repo
    out = run([str(BIN / "dvc"), "repro", "reconstruct", "interpolate"], path, env)
    assert sorted(ran_stages(out.stdout + out.stderr)) == ["interpolate", "reconstruct"]  # in either order
    latent = path / "results" / "latent"
    table = (latent / "reconstruct.csv").read_text().splitlines()
    assert table[0].startswith("steps,spacing,nfe,mse") and [r.split(",")[0] for r in table[1:]] == ["2", "4"]
    assert {"reconstruct.md", "reconstruct.png", "interpolation.png", "interpolation.json"} <= {
        p.name for p in latent.iterdir()
    }
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], path, env).stdout)
    assert "results/latent/reconstruct.json" in json.dumps(shown)
    again = run([str(BIN / "dvc"), "repro", "reconstruct", "interpolate"], path, env)
    assert ran_stages(again.stdout + again.stderr) == []


def _latest_pipeline_run_artifacts() -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["ddim-pipeline"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        assert latest.state.is_completed(), latest.state
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id])))
    return {a.key for a in artifacts}


def test_ddim_pipeline_publishes_metrics_and_runs_experiments(served_repo):
    path, env = served_repo
    out = run([str(BIN / "ddim"), "pipeline"], path, env)
    assert json.loads(out.stdout.splitlines()[-1])["metrics"][0]["fid"] > 0
    assert {"dvc-metrics", "mlflow-run"} <= _latest_pipeline_run_artifacts()

    # With --set it is a DVC experiment: only the stages that read the changed param rerun.
    out = run([str(BIN / "ddim"), "pipeline", "--set", "sample.eta=0.0"], path, env)
    assert ran_stages(out.stdout + out.stderr) == ["sample", "evaluate"]
    assert json.loads(out.stdout.splitlines()[-1])["metrics"][0]["eta"] == 0.0
    assert {"dvc-metrics", "mlflow-run"} <= _latest_pipeline_run_artifacts()


def _flow_runs_of(deployment_name: str) -> tuple[Any, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    return deployment, runs


def test_prefect_yaml_deploys_and_a_worker_runs_it(served_repo):
    path, env = served_repo
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "ddim-process", "--type", "process"], path, env)
    run([prefect, "--no-prompt", "deploy", "--all"], path, env)
    deployment, _ = _flow_runs_of("ddim-pipeline/nightly")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    workdir = {"prefect.deployments.steps.set_working_directory": {"directory": str(path.resolve())}}
    assert deployment.pull_steps == [workdir], "flow runs must run in the directory deployed from"

    run([prefect, "deployment", "run", "ddim-pipeline/nightly"], path, env)
    run([prefect, "worker", "start", "--pool", "ddim-process", "--run-once"], path, env, timeout=600)
    _, runs = _flow_runs_of("ddim-pipeline/nightly")
    finished = [r for r in runs if r.state and r.state.is_final()]
    assert len(finished) == 1 and finished[0].state.is_completed(), finished


def test_ddim_serve_runs_a_triggered_flow_run(served_repo):
    path, env = served_repo
    serve = subprocess.Popen(
        [str(BIN / "ddim"), "serve", "--cron", "0 3 * * *"],
        cwd=path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # the serve process registers its deployment first
            try:
                _flow_runs_of("ddim-pipeline/ddim-pipeline-served")
                break
            except Exception:
                assert serve.poll() is None and time.monotonic() < deadline, "ddim serve did not register"
                time.sleep(1)
        run([str(BIN / "prefect"), "deployment", "run", "ddim-pipeline/ddim-pipeline-served"], path, env)
        deadline = time.monotonic() + 300
        while True:
            deployment, runs = _flow_runs_of("ddim-pipeline/ddim-pipeline-served")
            finished = [r for r in runs if r.state and r.state.is_final()]
            if finished:
                break
            assert time.monotonic() < deadline, [r.state for r in runs]
            time.sleep(2)
        assert finished[0].state.is_completed(), finished[0].state
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
        time.sleep(1)


def _render_until(url: str, needles: list[str], seconds: float = 120) -> str:
    """The page as Chromium renders it, once it shows every needle (a UI just started may render empty)."""
    from pipelines.browser import render

    deadline = time.monotonic() + seconds
    while True:
        page = render(url)
        if all(needle in page for needle in needles) or time.monotonic() > deadline:
            return page
        time.sleep(2)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed here when missing (as root with apt-get, as on CI). Elsewhere the browser
    test is skipped, except where DDIM_REQUIRE_BROWSER is set (.ci/run): there a missing browser fails."""
    from pipelines.browser import find_chromium

    if find_chromium() is None and shutil.which("apt-get") and os.geteuid() == 0:
        apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=apt, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=apt, capture_output=True, timeout=900)
    found = find_chromium()
    if found is None:
        message = "needs Chromium: apt-get install chromium (Debian), or put chromium on PATH"
        if os.environ.get("DDIM_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_make_ui_shows_the_runs_in_a_browser_and_ui_stop_ends_exactly_them(repo, chromium):
    from pipelines.browser import mlflow_experiment_url, mlflow_registered_model_url, prefect_runs_url

    path, env = repo  # after `make demo`: its flow runs and its training run are the ones to show
    ports = [f"PREFECT_PORT={free_port()}", f"MLFLOW_PORT={free_port()}"]
    started = run(["make", "ui", *ports], path, env)
    pids = {name: int((path / ".ui" / f"{name}.pid").read_text()) for name in ("prefect", "mlflow")}
    try:
        # (make prints "Entering directory" lines too when the tests themselves run under `make test`)
        prefect_url = re.search(r"^Prefect UI: (\S+)", started.stdout, re.MULTILINE).group(1)
        mlflow_url = re.search(r"^MLflow UI: +(http://[\d.:]+)(\S+)", started.stdout, re.MULTILINE).group(1)
        assert f"{mlflow_url}/#/experiments?workflowType=machine_learning" in started.stdout  # the runs view
        assert prefect_url.startswith("http://127.0.0.1:") and mlflow_url.startswith("http://127.0.0.1:")
        _wait_for(f"{prefect_url}/api/health", 120)
        _wait_for(f"{mlflow_url}/health", 120)
        with urllib.request.urlopen(f"{prefect_url}/ui-settings", timeout=10) as response:
            assert json.loads(response.read())["api_url"] == f"{prefect_url}/api"  # the UI calls its own port
        assert "already running" in run(["make", "ui", *ports], path, env).stdout
        # Without PREFECT_API_URL, a ddim command run here reports to the UI's server, not a temporary one.
        prepared = run([str(BIN / "ddim"), "prepare"], path, env)
        assert f"View at {prefect_url}/runs/flow-run/" in prepared.stdout + prepared.stderr

        # What a user sees: the pages as Chromium renders them, after their scripts have asked the servers.
        stages = ("prepare", "reference", "train", "sample", "evaluate")
        prefect_page = _render_until(prefect_runs_url(prefect_url), [f"{stage}-shapes16" for stage in stages])
        for stage in stages:
            assert f"{stage}-shapes16" in prefect_page, f"flow run {stage}-shapes16 not on the Prefect runs page"
        assert "Can't connect" not in prefect_page
        mlflow_page = _render_until(mlflow_experiment_url(mlflow_url, "ddim"), ["shapes16-ch32-4steps"])
        assert "shapes16-ch32-4steps-lambda0.1-scaled" in mlflow_page, "the training run, by name"
        assert "Run Name" in mlflow_page and "Overview" not in mlflow_page  # the runs table, not GenAI's overview
        registry_page = _render_until(mlflow_registered_model_url(mlflow_url, "ddim-shapes16"), ["champion"])
        assert "champion" in registry_page and "Version 1" in registry_page, "the registered model and its alias"
        shots = run(["make", "screenshots", *ports], path, env)  # the README's pictures, into docs/
        for shot in ("ui-prefect-runs.png", "ui-mlflow-runs.png", "ui-mlflow-registry.png"):
            assert f"docs/{shot}" in shots.stdout and Image.open(path / "docs" / shot).size == (1440, 900)
    finally:
        stopped = run(["make", "ui-stop"], path, env)
    assert all(f"stopped {name} ({pid})" in stopped.stdout for name, pid in pids.items())
    for pid in pids.values():  # each was a process group leader: nothing of it is left
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not list((path / ".ui").glob("*.pid"))


def test_ddim_pipeline_imports_a_zip_of_images(served_repo, tmp_path):
    path, env = served_repo
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(20):
            buffer = io.BytesIO()
            Image.new("RGB", (48, 40), (10 * i, 120, 200)).save(buffer, format="JPEG")
            zf.writestr(f"faces/{i:05d}.jpg", buffer.getvalue())
    sets = ["data.source=folder", f"data.path={archive}", "data.name=faces"]
    out = run([str(BIN / "ddim"), "pipeline", *(a for s in sets for a in ("--set", s)), "prepare"], path, env)
    assert ran_stages(out.stdout + out.stderr) == ["prepare"]
    manifest = json.loads((path / "data" / "prepared" / "faces" / "manifest.json").read_text())
    assert manifest["count"] == 20 and manifest["height"] == 16


def test_a_pretrained_model_is_imported_instead_of_trained(served_repo, tmp_path):
    # What `ddim profile cifar10-pretrained && dvc repro evaluate` does, with a small diffusers model of the
    # micro U-Net's shape on disk instead of DDPM's download.
    import torch
    from diffusers import UNet2DModel

    path, env = served_repo
    torch.manual_seed(0)
    UNet2DModel(**SMALL).save_pretrained(tmp_path / "ddpm-small")
    out = run([str(BIN / "ddim"), "pipeline", "--set", f"model.pretrained={tmp_path / 'ddpm-small'}"], path, env)
    assert ran_stages(out.stdout + out.stderr) == ["train", "sample", "evaluate"]
    state = torch.load(path / "results" / "train" / "model.pt", weights_only=True)
    assert state["source"]["kind"] == "import" and state["source"]["layout"] == "diffusers"
    assert json.loads(out.stdout.splitlines()[-1])["metrics"][0]["fid"] > 0


def test_switching_profile_is_one_command_that_dvc_params_diff_shows(repo):
    path, env = repo
    ddim = [str(BIN / "ddim"), "profile", "--profiles", str(ROOT / "profiles")]
    out = subprocess.run([*ddim, "no-such"], cwd=path, env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert "choose one of celebahq, cifar10, cifar10-ch64, cifar10-pretrained, demo" in out.stderr
    run([*ddim, "cifar10"], path, env)
    assert load_params(path / "params.yaml") == profile_params("cifar10", ROOT / "profiles")
    assert "  ch: 128 " in (path / "params.yaml").read_text(), "complete and commented, not the bare overlay"
    diff = json.loads(run([str(BIN / "dvc"), "params", "diff", "--json"], path, env).stdout)["params.yaml"]
    assert (diff["model.ch"]["old"], diff["model.ch"]["new"]) == (32, 128)
    assert (diff["data.source"]["old"], diff["data.source"]["new"]) == ("shapes", "cifar10")


def _experiments(show: list[dict]) -> dict[str, dict]:
    """``dvc exp show --json``: each experiment's name -> its metrics files' data."""
    found = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                metrics = (rev.get("data") or {}).get("metrics") or {}
                found[rev.get("name") or rev["rev"]] = {f: m.get("data", {}) for f, m in metrics.items()}
    return found


def test_a_queued_grid_reaches_the_projects_mlflow_store_and_dvc_exp_show(served_repo):
    """`dvc exp run --queue -S train.seed=1,2`, `dvc queue start -j 2`: each experiment runs in a temporary copy
    of the project that DVC deletes; its MLflow runs land in the project's store, tagged with its name, and
    its metrics (the FID, NFE, the final loss) in its commit, where `dvc exp show` reads them."""
    path, env = served_repo
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["tracking"]["uri"] = None  # the default store, as users have it: the project's mlflow.db
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "the default tracking store"], path, env)
    dvc = str(BIN / "dvc")
    run([dvc, "exp", "run", "--queue", "-S", "train.seed=1,2"], path, env)
    try:
        run([dvc, "queue", "start", "-j", "2"], path, env)
        deadline = time.time() + 900
        while time.time() < deadline:
            status = run([dvc, "queue", "status"], path, env).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(5)
        assert status.count("Success") == 2, status
    finally:
        subprocess.run([dvc, "queue", "stop", "--kill"], cwd=path, env=env, capture_output=True, timeout=120)
    experiments = _experiments(json.loads(run([dvc, "exp", "show", "--json"], path, env).stdout))
    assert len(experiments) == 2, experiments
    for metrics in experiments.values():
        assert metrics["results/metrics.json"]["fid"] > 0 and metrics["results/metrics.json"]["nfe"] > 0
        assert metrics["results/train/train_metrics.json"]["step"] == 4
        assert metrics["results/train/train_metrics.json"]["loss"] > 0
    first, second = sorted(experiments)  # seeds 1 and 2: other samples, another FID
    diff = json.loads(run([dvc, "metrics", "diff", first, second, "--json"], path, env).stdout)
    assert diff["results/metrics.json"]["fid"]["old"] == experiments[first]["results/metrics.json"]["fid"]
    assert diff["results/metrics.json"]["fid"]["new"] == experiments[second]["results/metrics.json"]["fid"]
    plots = json.loads(run([dvc, "plots", "diff", first, second, "--json", "--split"], path, env).stdout)
    (curve,) = [v for name, v in plots["data"].items() if name.endswith("train_metrics.csv")]  # the loss curve
    assert set(curve[0]["revisions"]) == {first, second}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddim").experiment_id])
    tagged = {r.data.tags.get("dvc.experiment") for r in runs if r.data.tags.get("stage") == "train"}
    assert set(experiments) <= tagged
    table = run([str(BIN / "ddim"), "runs", "--csv", "-"], path, env).stdout
    assert all(name in table for name in experiments)
    assert not list((path / ".dvc" / "tmp" / "exps").glob("**/mlflow.db")), "no store inside DVC's copies"
