"""``tracking.enabled: false``: every stage runs with no MLflow (and no Prefect) imported, and records nothing.

The stages run in a fresh interpreter, through the entry points that need neither: ``tasks.<stage>.run`` and
the torchrun launcher's ``pipelines.ranks.main`` (``ddim`` itself starts Prefect flows). Evaluate reads the real
Inception weights from the torch hub cache (``ddim fid-weights`` puts them there), as the evaluate tests do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import cli_env

from tasks.common.config import TrackingConfig
from tasks.common.errors import UserError
from tasks.common.tracking import NullTracker, Tracker, compare_runs, log_child_run, log_evaluation

ROOT = Path(__file__).resolve().parents[1]

# The four stages in one process, then what it imported. Train and sample go through the torchrun launcher
# (one process: no torchrun environment), with the switch given as `--set`, as `ddim` hands it on.
STAGES = """
import json, sys
from pipelines import ranks
from tasks import evaluate, prepare, reference
from tasks.common.config import load_params

params = load_params("params.yaml", ["tracking.enabled=false"])
prepare.run(params)
reference.run(params)
for stage in ("train", "sample"):
    argv = [stage, "--result", f"{stage}.json", "--params", "params.yaml", "--set", "tracking.enabled=false"]
    assert ranks.main(argv) == 0, stage
result = {"evaluate": evaluate.run(params), "imported": [m for m in ("mlflow", "prefect") if m in sys.modules]}
with open("stages.json", "w") as f:
    json.dump(result, f)
"""


def tiny_params(root: Path) -> dict:
    """A micro U-Net on 64 shapes at 16 px, a few steps and images; every path inside ``root``; no
    ``tracking.uri``, so MLflow's default store would be ``root/mlflow.db``."""
    return {
        "paths": {
            **{k: str(root / k) for k in ("raw", "prepared", "checkpoints", "train", "reference", "samples")},
            "metrics": str(root / "metrics.json"),
        },
        "data": {"name": "s", "source": "shapes", "image_size": 16, "count": 64},
        "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8]},
        "train": {
            "steps": 4,
            "batch_size": 8,
            "warmup": 1,
            "log_every": 2,
            "checkpoint_every": 4,
            "sample_every": 0,
            "num_workers": 0,
            "device": "cpu",
        },
        "sample": {"num_samples": 8, "batch_size": 8, "steps": 3, "device": "cpu"},
        "evaluate": {"reference_count": 16, "batch_size": 16, "num_workers": 0, "device": "cpu"},
        "tracking": {"experiment": "off"},
    }


@pytest.mark.slow
@pytest.mark.integration
def test_the_stages_run_without_mlflow_or_prefect_and_record_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tmp_path)))
    env = {k: v for k, v in cli_env().items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(STAGES)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "stages.json").read_text())
    assert result["imported"] == []
    assert result["evaluate"]["mlflow_run_id"] is None and result["evaluate"]["num_samples"] == 8
    assert json.loads((tmp_path / "train.json").read_text())["mlflow_run_id"] is None
    assert json.loads((tmp_path / "sample.json").read_text())["complete"]
    assert json.loads((tmp_path / "metrics.json").read_text())["fid"] > 0
    for output in ("train/model.pt", "train/train_metrics.csv", "reference/s.npz", "samples/grid.png"):
        assert (tmp_path / output).is_file(), output
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 8
    assert not list(tmp_path.rglob("mlflow*")) and not list(tmp_path.rglob("mlruns")), "nothing tracked"
    assert not list(tmp_path.rglob("mlartifacts"))


def test_with_tracking_off_nothing_is_logged_and_runs_cannot_be_compared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    off = TrackingConfig(enabled=False)
    tracker = Tracker.for_training(off, {"train": {"lr": 1.0}}, {"stage": "train"}, tmp_path)
    assert type(tracker) is NullTracker and tracker.run_id is None
    metrics = {"sampler": "ddim", "steps": 3, "eta": 0.0, "spacing": None, "fid": 1.0}
    assert (
        log_evaluation(
            off, "a-run-id", {"sample": {}}, metrics, None, model_sha256="0", reference=tmp_path, clip_x0=True
        )
        is None
    )
    assert log_child_run(off, None, "child", {}, {"fid": 1.0}) is None
    with pytest.raises(UserError) as error:
        compare_runs(off)
    message = str(error.value)
    assert "\n" not in message and "tracking.enabled is false" in message
    assert "tracking.enabled=true" in message
    assert list(tmp_path.iterdir()) == []  # no store, no run id file
