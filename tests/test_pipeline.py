"""The whole pipeline with the real tools: dvc repro of a micro profile in a fresh git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["models", "tasks", "pipelines", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"]

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
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository holding the project with params.yaml shrunk to the micro profile."""
    repo = tmp_path_factory.mktemp("repo")
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in MICRO.items():
        params[section].update(values)
    params["tracking"]["uri"] = f"sqlite:///{repo / 'mlflow.db'}"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(repo / ".prefect-home"),
        "PYTHONPATH": str(repo),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    env.pop("PREFECT_API_URL", None)
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "/.prefect-home/\n")
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "micro"], repo, env)
    return repo, env


def test_dvc_repro_runs_everything_then_only_what_changed(repo):
    path, env = repo
    first = run([str(BIN / "dvc"), "repro"], path, env)
    assert ran_stages(first.stdout) == ["prepare", "reference", "train", "sample", "evaluate"]
    status = run([str(BIN / "dvc"), "status"], path, env)
    assert "up to date" in status.stdout

    again = run([str(BIN / "dvc"), "repro"], path, env)
    assert ran_stages(again.stdout) == []

    metrics = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], path, env).stdout)
    values = next(iter(metrics.values()))["data"]["results/metrics.json"]["data"]
    assert values["num_samples"] == 8 and values["fid"] > 0 and values["steps"] == 3

    params = yaml.safe_load((path / "params.yaml").read_text())
    params["sample"]["steps"] = 4
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run([str(BIN / "dvc"), "repro"], path, env)
    assert ran_stages(changed.stdout) == ["sample", "evaluate"]

    table = run([str(BIN / "ddim"), "runs", "--csv", "-"], path, env).stdout.strip().splitlines()
    assert len(table) == 3, "a header, then one row per sampling config of the one trained model"
    assert "fid" in table[0].split(",")


def test_pipeline_flow_publishes_metrics(prefect_server, repo, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from pipelines.flows import pipeline_flow

    path, env = repo
    monkeypatch.chdir(path)
    monkeypatch.setenv("PATH", env["PATH"])
    state = pipeline_flow(return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["metrics"][0]["fid"] > 0
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert {"dvc-metrics", "mlflow-run"} <= {a.key for a in artifacts}


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_is_valid(profile):
    from tasks.config import load_params

    params = load_params(ROOT / "profiles" / f"{profile}.yaml")
    params.model.unet_config(params.data.image_size)


def test_switching_profile_is_one_command_that_dvc_params_diff_shows(repo):
    # Last in this module: it leaves the shared repository on another profile.
    path, env = repo
    ddim = [str(BIN / "ddim"), "profile", "--profiles", str(ROOT / "profiles")]
    out = subprocess.run([*ddim, "no-such"], cwd=path, env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "choose one of celebahq, cifar10, cifar10-ch64, demo" in out.stderr
    run([*ddim, "cifar10-ch64"], path, env)
    assert (path / "params.yaml").read_text() == (ROOT / "profiles" / "cifar10-ch64.yaml").read_text()
    diff = json.loads(run([str(BIN / "dvc"), "params", "diff", "--json"], path, env).stdout)["params.yaml"]
    assert (diff["model.ch"]["old"], diff["model.ch"]["new"]) == (32, 64)
    assert (diff["data.source"]["old"], diff["data.source"]["new"]) == ("shapes", "cifar10")
