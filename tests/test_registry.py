"""The model leaves the pipeline through MLflow: each training run logs its EMA models as MLflow 3 logged models
(pyfuncs), every evaluation's FID is linked to the model it scored, `ddim register` puts the best comparable one
in the registry under an alias, and `models:/<name>@champion` draws `ddim sample`'s images, through
`mlflow.pyfunc.load_model` and through `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import free_port, read_images, setup_run

from pipelines.cli import main
from tasks import evaluate, reference, sample, train
from tasks.common.checkpoint import load_model
from tasks.common.config import load_params, render_params
from tasks.common.tracking import read_run_id

pytestmark = pytest.mark.slow  # each trains micro models and scores their samples (about 10-30 s here)


def micro_project(root: Path, **train_keys) -> Path:
    """The micro model's params in ``root`` with its dataset, and its reference statistics of 16 images."""
    params_file = setup_run(root, f"sqlite:///{root / 'mlflow.db'}", steps=6, deterministic=False, **train_keys)
    raw = yaml.safe_load(params_file.read_text())
    raw["paths"].update(reference=str(root / "ref"), samples=str(root / "samples"), metrics=str(root / "m.json"))
    raw["sample"] = {"num_samples": 8, "batch_size": 8, "steps": 5, "spacing": "trailing", "device": "cpu"}
    raw["evaluate"] = {"reference_count": 16, "batch_size": 16, "num_workers": 0}
    params_file.write_text(yaml.safe_dump(raw))
    reference.run(load_params(params_file))
    return params_file


def train_sample_evaluate(params_file: Path, *overrides: str) -> tuple[str, Path, dict]:
    """Train (or resume), sample into a folder named after the overrides, evaluate: (training run, samples, FID)."""
    samples = params_file.parent / ("samples-" + "-".join(o.replace("=", "") for o in overrides))
    params = load_params(params_file, [*overrides, f"paths.samples={samples}"])
    train.run(params)
    sample.run(params)
    return read_run_id(Path(params.paths.train)), samples, evaluate.run(params)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two models of two seeds, each evaluated as the params say, and the second also with 3 steps."""
    root = tmp_path_factory.mktemp("registry")
    params_file = micro_project(root, model_every=3)
    first = train_sample_evaluate(params_file, "train.seed=0")
    second = train_sample_evaluate(params_file, "train.seed=1")
    other = train_sample_evaluate(params_file, "train.seed=1", "sample.steps=3")
    return params_file, [first, second, other]


def client_of(params_file: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=load_params(params_file).tracking.uri)


def test_a_training_run_logs_its_ema_models_and_an_evaluation_links_its_fid(registry):
    params_file, [(run_id, _, result), (second_run, *_), _] = registry
    client = client_of(params_file)
    experiment = client.get_run(run_id).info.experiment_id
    models = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run_id]
    assert sorted(int(m.tags["step"]) for m in models) == [3, 6], "train.model_every=3, and the final one"
    again = [m for m in client.search_logged_models([experiment]) if m.source_run_id == second_run]
    assert sorted(int(m.tags["step"]) for m in again) == [3, 6], "a rerun after the last step logs nothing new"
    assert {m.status.name for m in models} == {"READY"} and {m.model_type for m in models} == {"ddim-eps-unet"}
    assert sorted(o.step for o in client.get_run(run_id).outputs.model_outputs) == [3, 6]
    evaluation = client.get_run(result["mlflow_run_id"])
    final = next(m for m in models if m.tags["step"] == "6")
    assert evaluation.data.tags["model_id"] == final.model_id
    assert {m.key: m.value for m in client.get_logged_model(final.model_id).metrics}["fid"] == result["fid"]
    assert json.loads(evaluation.data.tags["comparable"])["steps"] == 5


def test_register_picks_the_best_comparable_model_and_its_pyfunc_draws_ddim_samples_images(
    registry, capsys, monkeypatch, tmp_path
):
    import mlflow

    params_file, [first, second, _] = registry
    assert main(["register", "--params", str(params_file)]) == 0
    printed = capsys.readouterr().out.splitlines()
    best = min((first, second), key=lambda r: r[2]["fid"])  # `other` (3 steps) is measured another way
    client = client_of(params_file)
    name = "ddim-s"  # tracking.registered_model is null: ddim-<data.name>
    version = client.get_model_version_by_alias(name, "champion")
    model_id = client.get_run(best[2]["mlflow_run_id"]).data.tags["model_id"]
    assert version.tags["model_id"] == model_id and version.run_id == best[0]
    assert version.tags["measured"].startswith("ddim, steps 5, eta 0.0, spacing trailing, clip_x0 True; 8 images")
    assert version.source == client.get_logged_model(model_id).artifact_location
    assert printed[0] == f"registered {name} version {version.version} as @champion: model {model_id}"
    why = f"why: FID {best[2]['fid']:.3f}, the lowest of the 2 models evaluated as the params say"
    assert printed[1].startswith(why)
    assert "ddim, steps 5, eta 0.0, spacing trailing, clip_x0 True; 8 images against 16 reference images" in printed[1]
    assert printed[-1] == "not compared: 1 evaluations measured another way, repeated, or of no logged model"
    assert main(["register", "--params", str(params_file)]) == 0, "registering again adds no version"
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [version.version]

    capsys.readouterr()
    imported = tmp_path / "champion.pt"  # and back into the pipeline, byte for byte the logged model.pt
    assert main(["import-model", f"models:/{name}@champion", "--out", str(imported), "--params", str(params_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layout"] == "mlflow" and result["sha256"] == client.get_logged_model(model_id).tags["model_sha256"]
    assert load_model(imported)[0].state_dict().keys() and result["step"] == 6

    monkeypatch.setenv("MLFLOW_TRACKING_URI", load_params(params_file).tracking.uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images = pyfunc.predict(pd.DataFrame({"seed": [0] * 8, "index": range(8)}))
    assert images.dtype == np.uint8 and np.array_equal(images, read_images(best[1], 8)), "ddim sample's PNGs"
    one = pyfunc.predict(pd.DataFrame({"seed": [0, 7]}), params={"steps": 3, "batch_size": 1})
    assert one.shape == (2, 16, 16, 3) and not np.array_equal(one[0], images[0]), "params reach the sampler"


def test_mlflow_models_serve_answers_with_the_same_images(registry, tmp_path):
    """`mlflow models serve` of the champion, in the current environment, over HTTP on 127.0.0.1."""
    params_file, runs = registry
    assert main(["register", "--params", str(params_file)]) == 0
    best = min(runs[:2], key=lambda r: r[2]["fid"])
    port, uri = free_port(), load_params(params_file).tracking.uri
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli), "models", "serve", "-m", "models:/ddim-s@champion", "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )
    try:
        body = json.dumps({"dataframe_records": [{"seed": 0, "index": i} for i in range(8)]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        for _ in range(120):
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    predictions = np.asarray(json.load(answer)["predictions"], dtype=np.uint8)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not answer in 60 s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert np.array_equal(predictions, read_images(best[1], 8))


def test_register_refuses_with_one_line(tmp_path, capsys):
    params_file = micro_project(tmp_path)

    def error(*args: str) -> str:
        assert main(["register", "--params", str(params_file), *args]) == 1
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert error().startswith(
        "ddim register: error: none of the 0 evaluations in experiment 'test' was measured as the params say (ddim,"
    )
    assert "--alias 'v1': letters, digits, _ and -, not v<number> or latest" in error("--alias", "v1")
    assert "tracking is off" in error("--set", "tracking.enabled=false")
    assert "not found: run `ddim reference` first" in error("--set", f"paths.reference={tmp_path / 'none'}")

    def imported(*args: str) -> str:
        out = ["--out", str(tmp_path / "m.pt"), "--params", str(params_file)]
        assert main(["import-model", "models:/ddim-s@champion", *out, *args]) == 1
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert imported().startswith("ddim import-model: error: models:/ddim-s@champion cannot be fetched from MLflow")
    start, dead = time.monotonic(), f"http://127.0.0.1:{free_port()}"
    assert f"cannot be fetched from MLflow at {dead}" in imported("--set", f"tracking.uri={dead}")
    assert time.monotonic() - start < 60, "a server that does not answer is one line, soon"
    assert not (tmp_path / "m.pt").exists()


def test_fid_while_training_is_a_curve_in_mlflow_and_dvc_and_its_best_checkpoint_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params_file = micro_project(tmp_path, fid_every=3, fid_samples=8, checkpoint_every=100, keep_checkpoints=1)
    summary = train.run(load_params(params_file))
    out, checkpoints = tmp_path / "out", next((tmp_path / "ckpt").iterdir())
    rows = pd.read_csv(out / "train_fid.csv")
    assert rows["step"].tolist() == [3, 6] and (rows["num_samples"] == 8).all() and (rows["fid"] > 0).all()
    best_step = int(rows.loc[rows["fid"].idxmin(), "step"])
    best = json.loads((checkpoints / "best.json").read_text())
    assert best["step"] == best_step and best["train_fid"] == pytest.approx(rows["fid"].min())
    kept = sorted(p.name for p in checkpoints.glob("ckpt-*.pt"))
    assert kept == sorted({f"ckpt-{best_step:08d}.pt", "ckpt-00000006.pt"}), "the newest and the best"
    named = json.loads((out / "train_run.json").read_text())["best_checkpoint"]
    assert named["path"] == str(checkpoints / f"ckpt-{best_step:08d}.pt") and named["step"] == best_step
    assert summary["best_checkpoint"] == named and named["num_samples"] == 8 and named["sampler"] == "ddim"

    client = client_of(params_file)
    history = client.get_metric_history(summary["mlflow_run_id"], "train_fid")
    assert [(m.step, m.value) for m in history] == list(zip(rows["step"], rows["fid"], strict=True))
    experiment = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    linked = {
        int(m.tags["step"]): {x.key: x.value for x in client.get_logged_model(m.model_id).metrics}
        for m in client.search_logged_models([experiment])
    }
    assert sorted(linked) == [3, 6], "a logged model at each FID step (the last one is the final model)"
    fids = dict(zip(rows["step"], rows["fid"], strict=True))
    assert {step: metrics["train_fid"] for step, metrics in linked.items()} == fids, "linked to the model it scored"

    assert main(["checkpoints", "--params", str(params_file)]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    column = header.index("best_fid_step")  # the values are right-aligned under their header
    assert row[column : column + len("best_fid_step")].strip() == str(best_step), "ddim checkpoints names the best"

    train.run(load_params(params_file, ["train.steps=8", "train.fid_every=0"]))  # more steps, no FID
    assert (checkpoints / f"ckpt-{best_step:08d}.pt").is_file(), "the best is never pruned"
    assert json.loads((out / "train_run.json").read_text())["best_checkpoint"]["step"] == best_step
    assert len(pd.read_csv(out / "train_fid.csv")) == 2, "the curve keeps its rows"

    assert dvc_plot_steps(tmp_path, "train_fid.csv") == [3, 6]


def dvc_plot_steps(root: Path, name: str) -> list[int]:
    """The steps of the plot ``name`` that `dvc plots show` finds with the project's dvc.yaml in ``root`` (its
    params' paths made relative: DVC reads plots inside the repository by relative path)."""
    repo = Path(__file__).resolve().parents[1]
    (root / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    params = load_params(root / "params.yaml")  # every key, as dvc.yaml interpolates them
    relative = {key: Path(os.path.relpath(value, root)) for key, value in params.paths.model_dump().items()}
    params = params.model_copy(update={"paths": params.paths.model_copy(update=relative)})
    (root / "params.yaml").write_text(render_params(params, "the micro project"))
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=root, check=True)
    shown = subprocess.run([dvc, "plots", "show", "--json"], cwd=root, capture_output=True, text=True, check=True)
    answer = json.loads(shown.stdout)
    assert "data" in answer, shown.stdout[:2000]
    curves = {Path(plot).name: data for plot, data in answer["data"].items()}
    return [int(v["step"]) for v in curves[name][0]["content"]["data"]["values"]]
