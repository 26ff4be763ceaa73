"""Experiments as DVC runs them: a queued ``dvc exp run`` works in a temporary copy of the project, which DVC
deletes afterwards. What must outlive it (the MLflow store, the checkpoints) goes to the project's root, which
DVC passes to every stage command as ``DVC_ROOT``, and its MLflow runs carry the experiment's name."""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import setup_run
from mlflow.tracking import MlflowClient

from tasks import train
from tasks.common.config import TrackingConfig, load_params
from tasks.common.files import project_path
from tasks.common.tracking import experiment_tags, tracking_uri


def test_project_paths_are_the_dvc_roots_and_otherwise_the_current_directorys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert project_path("data/checkpoints") == Path("data/checkpoints")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # `dvc repro` in the project itself: nothing changes
    assert project_path("data/checkpoints") == Path("data/checkpoints")
    monkeypatch.setenv("DVC_ROOT", "/project")  # a queued experiment's copy
    assert project_path("data/checkpoints") == Path("/project/data/checkpoints")
    assert project_path("/elsewhere/ckpt") == Path("/elsewhere/ckpt")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig()) == "sqlite:////project/mlflow.db"


def test_experiment_tags_name_the_dvc_experiment(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert experiment_tags() == {}
    monkeypatch.setenv("DVC_EXP_NAME", "swell-gaur")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    assert experiment_tags() == {"dvc.experiment": "swell-gaur", "dvc.baseline_rev": "abc123"}


def test_a_run_in_a_temporary_copy_logs_and_checkpoints_in_the_project(tmp_path, monkeypatch):
    project, copy = tmp_path / "project", tmp_path / "project" / ".dvc" / "tmp" / "exps" / "run" / "x"
    params_file = setup_run(copy, f"sqlite:///{tmp_path}/unused.db", steps=4, checkpoint_every=2)
    raw = yaml.safe_load(params_file.read_text())
    raw["tracking"] = {"experiment": "ddim"}  # the default store
    raw["paths"]["checkpoints"] = "data/checkpoints"  # relative, as in params.yaml
    params_file.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_EXP_NAME", "swell-gaur")
    summary = train.run(load_params(params_file))

    assert not (copy / "mlflow.db").exists() and not (copy / "data" / "checkpoints").exists()
    assert len(list((project / "data" / "checkpoints").glob("*/ckpt-00000004.pt"))) == 1
    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run.data.tags["dvc.experiment"] == "swell-gaur"
