"""The stages through their Prefect flows and through the `ddim` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cli_env, setup_run
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from pipelines.flows import FLOWS

pytestmark = pytest.mark.integration  # DVC, Prefect servers and subprocesses

DDIM = str(Path(sys.executable).with_name("ddim"))


def write_params(tmp_path: Path, **data) -> Path:
    params = {
        "paths": {"raw": str(tmp_path / "raw"), "prepared": str(tmp_path / "prepared")},
        "data": {"name": "shapes", "source": "shapes", "image_size": 16, "count": 30, **data},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_prepare_flow_completes_with_a_manifest_artifact(prefect_server, tmp_path):
    params = write_params(tmp_path)
    state = FLOWS["prepare"](params_file=str(params), overrides=["data.count=12"], return_state=True)
    assert state.is_completed()
    manifest = state.result()
    assert manifest["count"] == 12
    assert json.loads((tmp_path / "prepared" / "shapes" / "manifest.json").read_text())["count"] == 12
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dataset-manifest"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
        )
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert len(artifacts) == 1 and manifest["sha256"] in artifacts[0].data
    assert flow_run.name == "prepare-shapes data.count=12"  # the UI's runs list: stage, dataset, overrides


def test_ddim_prepare_imports_a_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (50 * i, 100, 200)).save(tmp_path / "imgs" / f"{i}.jpg")
    params = write_params(tmp_path, name="folder", source="folder", path=str(tmp_path / "imgs"), count=None)
    out = subprocess.run(
        [DDIM, "prepare", "--params", str(params), "--set", "data.image_size=32"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["count"] == 5 and summary["height"] == 32
    assert (tmp_path / "prepared" / "folder" / "preview.png").is_file()


def test_ddim_prepare_errors_are_one_line_without_output(tmp_path):
    params = write_params(tmp_path, name="bad", source="folder", path=str(tmp_path / "missing"))
    # A config error fails before any engine starts ...
    bad_size = subprocess.run(
        [DDIM, "prepare", "--params", str(params), "--set", "data.image_size=20"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert bad_size.returncode == 1
    assert bad_size.stderr.strip() == (
        "ddim prepare: error: invalid params: data.image_size: must be a positive multiple of 8 "
        "(e.g. 32, 64, 256), got 20"
    )
    # ... and an input error inside the flow ends with the same one-line form and no traceback.
    missing = subprocess.run(
        [DDIM, "prepare", "--params", str(params)], capture_output=True, text=True, env=cli_env(), timeout=300
    )
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("ddim prepare: error:")]
    assert errors == [
        f"ddim prepare: error: data.path {tmp_path / 'missing'} does not exist: point it at a "
        "directory or .zip of images"
    ]
    assert not (tmp_path / "prepared" / "bad").exists()


def _artifact_keys(flow_run_id) -> set[str]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key for a in artifacts}


def test_train_flow_single_process_and_torchrun(prefect_server, tmp_path):
    params = setup_run(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", steps=4, log_every=2, checkpoint_every=2)
    state = FLOWS["train"](params_file=str(params), return_state=True)
    assert state.is_completed()
    assert state.result()["step"] == 4
    assert {"training-summary", "training-progress"} <= _artifact_keys(state.state_details.flow_run_id)

    # train.nproc_per_node > 1: the flow launches torchrun and reads rank 0's summary from the file rank 0 writes
    state = FLOWS["train"](
        params_file=str(params),
        overrides=[
            "train.nproc_per_node=2",
            "train.steps=6",
            "train.batch_size=8",
            f"paths.checkpoints={tmp_path}/ddp",
        ],
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert state.result()["ranks_in_sync"] is True and state.result()["step"] == 6


def test_a_ranks_user_error_is_the_flows_error_and_its_prints_are_not_its_result(prefect_server, tmp_path, monkeypatch):
    """Under torchrun (run_ranks), a rank's error the user can fix fails the flow with that rank's own message,
    and the result is what rank 0 wrote to its result file, whatever else the ranks print."""
    from pipelines.flows import PipelineError

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = setup_run(tmp_path, mlflow_uri, steps=2, batch_size=8, log_every=1, checkpoint_every=2)
    ddp = ["train.nproc_per_node=2"]

    # Each rank stops at once: no such prepared dataset. The flow's error is the ranks' line, not torchrun's exit.
    with pytest.raises(PipelineError) as failed:
        FLOWS["train"](params_file=str(params), overrides=[*ddp, "data.name=gone"])
    gone = tmp_path / "prepared" / "gone"
    assert str(failed.value) == f"{gone} is not a prepared dataset (no manifest.json): run `ddim prepare` first"

    # Each rank prints a line that looks like a summary, last thing before it exits (after rank 0's result).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, json, os, pathlib\n"
        "if 'RANK' in os.environ:\n"
        "    rank = os.environ['RANK']\n"
        "    atexit.register(print, json.dumps({'step': -1, 'ranks_in_sync': False}), flush=True)\n"
        f"    atexit.register(pathlib.Path({str(site)!r}, 'printed-' + rank).touch)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    result = FLOWS["train"](params_file=str(params), overrides=ddp)
    assert sorted(p.name for p in site.glob("printed-*")) == ["printed-0", "printed-1"], "both ranks printed it"
    assert result["step"] == 2 and result["ranks_in_sync"] is True
    assert result["mlflow_run_id"] == (tmp_path / "out" / "mlflow_run_id").read_text().strip()
