"""The train stage on CPU with tiny configs: learning, exact resume, DDP, MLflow, errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_env, refuse_host_reads, setup_run
from mlflow.tracking import MlflowClient

from models.unet import UNet
from tasks import train
from tasks.common.checkpoint import load_model
from tasks.common.config import ConfigError, load_params
from tasks.train import TrainingError

BIN = Path(sys.executable).parent


def metrics_rows(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "out" / "train_metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def rank(params: Path, *extra: str) -> list[str]:
    """The arguments after the launcher of the train stage's ranks: rank 0's result goes to ``result_file``."""
    return ["-m", "pipelines.ranks", "train", "--result", str(result_file(params)), "--params", str(params), *extra]


def result_file(params: Path) -> Path:
    return params.parent / "result.json"


def read_result(params: Path) -> dict:
    return json.loads(result_file(params).read_text())


def run_train(params: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The train stage as one rank (rank 0 of 1), as ``ddim train`` launches it; its result: read_result."""
    return subprocess.run(
        [sys.executable, *rank(params, *extra)], capture_output=True, text=True, timeout=timeout, cwd=params.parent
    )


def no_summary_line(stdout: str) -> bool:
    """Ranks print no JSON line: rank 0's result is in its result file."""
    return not any(line.lstrip().startswith("{") for line in stdout.splitlines())


def test_loss_falls_and_everything_is_logged(tmp_path, mlflow_uri):
    params = load_params(setup_run(tmp_path, mlflow_uri, steps=100, log_every=10, sample_every=50))
    summary = train.run(params)
    rows = metrics_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(10, 101, 10))
    first, last = float(rows[0]["loss"]), sum(float(r["loss"]) for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert set(rows[0]) == {"step", "loss", "mse", "complexity_term", "lr", "grad_norm", "images_per_s"}

    _, state = load_model(tmp_path / "out" / "model.pt")
    assert state["step"] == 100 and state["model_config"]["ch"] == 32
    assert summary["mlflow_run_id"] == (tmp_path / "out" / "mlflow_run_id").read_text().strip()

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)  # the UI opens it on the training runs
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "s-ch32-100steps-lambda0.1-scaled"  # what tells training runs apart
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.ch"] == "32"
    assert run.data.tags["dataset.sha256"] == json.loads((tmp_path / "prepared/s/manifest.json").read_text())["sha256"]
    assert "mlflow.source.git.commit" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(10, 101, 10))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in artifacts
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert grids == {"samples/step_00000050.png", "samples/step_00000100.png"}


def test_system_metrics_are_sampled_into_the_training_and_the_sampling_runs(tmp_path, mlflow_uri):
    """tracking.system_metrics: MLflow's own CPU and memory monitors, sampled into a run while it trains or samples
    (the sampling run is a child of the training run); a resumed run continues their steps; 0 turns them off."""
    from tasks import sample

    system = "system/cpu_utilization_percentage"
    fast = ["tracking.system_metrics=0.05", f"paths.samples={tmp_path / 'samples'}"]
    params_file = setup_run(tmp_path, mlflow_uri, steps=20, log_every=10, deterministic=False)
    summary = train.run(load_params(params_file, fast))
    client = MlflowClient(tracking_uri=mlflow_uri)
    first = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], system)]
    assert (
        first
        and first == list(range(len(first)))
        and all(0 <= m.value <= 100 for m in client.get_metric_history(summary["mlflow_run_id"], system))
    )
    assert "system/system_memory_usage_megabytes" in client.get_run(summary["mlflow_run_id"]).data.metrics
    train.run(load_params(params_file, [*fast, "train.steps=40"]))  # resumes the same run
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], system)]
    assert steps == list(range(len(steps))) and len(steps) > len(first), "the resumed run continues the steps"

    sample.run(load_params(params_file, [*fast, "sample.num_samples=16", "sample.steps=20", "sample.device=cpu"]))
    runs = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id], "tags.stage = 'sample'")
    (sampling,) = runs
    assert sampling.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"] and sampling.info.status == "FINISHED"
    assert sampling.info.run_name == "sample-ddim-20steps-eta0.0-quad" and sampling.data.metrics["images_per_s"] > 0
    assert client.get_metric_history(sampling.info.run_id, system), "sampled while it drew the images"

    off = train.run(load_params(setup_run(tmp_path / "off", mlflow_uri, steps=5), ["tracking.system_metrics=0"]))
    assert not client.get_metric_history(off["mlflow_run_id"], system)


def test_two_runs_with_the_same_seed_are_identical(tmp_path, mlflow_uri):
    a = train.run(load_params(setup_run(tmp_path / "a", mlflow_uri, steps=10)))
    b = train.run(load_params(setup_run(tmp_path / "b", mlflow_uri, steps=10)))
    assert a["weights_sha256"] == b["weights_sha256"]


@pytest.mark.integration
def test_sigkill_then_rerun_resumes_to_the_same_weights(tmp_path, mlflow_uri):
    reference_params = setup_run(tmp_path / "ref", mlflow_uri)
    reference = run_train(reference_params)
    assert reference.returncode == 0, reference.stderr

    params = setup_run(tmp_path / "killed", mlflow_uri, log_every=1)
    proc = subprocess.Popen(
        [sys.executable, *rank(params)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=params.parent,
    )
    deadline = time.time() + 240
    while not list((tmp_path / "killed" / "ckpt").glob("*/ckpt-00000010.pt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere past step 10, before the run can finish
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (ckpt,) = (p for p in (tmp_path / "killed" / "ckpt").iterdir() if p.is_dir())  # the recipe's folder
    run_id = (ckpt / "mlflow_run_id").read_text()

    resumed = run_train(params)
    assert resumed.returncode == 0, resumed.stderr
    summary = read_result(params)
    assert summary["resumed_from"] in (10, 20)
    assert summary["weights_sha256"] == read_result(reference_params)["weights_sha256"]
    assert summary["mlflow_run_id"] == run_id.strip()
    steps = [int(r["step"]) for r in metrics_rows(tmp_path / "killed")]
    assert steps == list(range(1, 31)), "no step logged twice, none missing"
    (ref_state,) = (torch.load(p, weights_only=True) for p in (tmp_path / "ref" / "ckpt").glob("*/ckpt-00000030.pt"))
    new_state = torch.load(ckpt / "ckpt-00000030.pt", weights_only=True)
    for name, tensor in ref_state["model"].items():
        assert torch.equal(tensor, new_state["model"][name]), name
    assert sorted(p.name for p in ckpt.glob("ckpt-*.pt")) == [
        "ckpt-00000010.pt",
        "ckpt-00000020.pt",
        "ckpt-00000030.pt",
    ]


@pytest.mark.integration
@pytest.mark.parametrize("cuda_graphs", [False, True])  # the graph's step, uncaptured on the CPU
def test_sigterm_writes_a_checkpoint_and_exits_non_zero(tmp_path, mlflow_uri, cuda_graphs):
    settings = {"steps": 100000, "checkpoint_every": 100000, "log_every": 1, "cuda_graphs": cuda_graphs}
    params = setup_run(tmp_path, mlflow_uri, **settings)
    proc = subprocess.Popen(
        [sys.executable, *rank(params)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        csv_path = tmp_path / "out" / "train_metrics.csv"
        if csv_path.exists() and len(csv_path.read_text().splitlines()) > 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "stopped at step" in err and "Traceback" not in err
    assert read_result(params)["error"].startswith("stopped at step"), "the error line's message, in the result file"
    saved = list((tmp_path / "ckpt").glob("*/ckpt-*.pt"))
    assert len(saved) == 1
    assert torch.load(saved[0], weights_only=True)["step"] >= 3


@pytest.mark.integration
def test_torchrun_two_ranks_stay_in_sync_and_only_rank0_writes(tmp_path, mlflow_uri):
    params = setup_run(tmp_path, mlflow_uri, steps=6, batch_size=8, log_every=3, checkpoint_every=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", *rank(params)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert no_summary_line(out.stdout), out.stdout[-3000:]
    summary = read_result(params)  # rank 0's: only rank 0 writes, and tracks
    assert summary["ranks_in_sync"] is True and summary["step"] == 6
    assert [int(r["step"]) for r in metrics_rows(tmp_path)] == [3, 6]
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("test").experiment_id],
        filter_string=f"tags.dataset.name = 's' and attributes.run_id = '{summary['mlflow_run_id']}'",
    )
    assert len(runs) == 1


@pytest.mark.parametrize("cuda_graphs", [False, True])  # the graph's step, uncaptured on the CPU
def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path, mlflow_uri, cuda_graphs):
    settings = {"steps": 40, "checkpoint_every": 2, "log_every": 2, "lr": 1e30, "warmup": 0, "cuda_graphs": cuda_graphs}
    params = load_params(setup_run(tmp_path, mlflow_uri, **settings))
    with pytest.raises(TrainingError, match=r"loss or gradient became NaN or inf at step \d+"):
        train.run(params)
    for path in (tmp_path / "ckpt").glob("*/ckpt-*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_nan_gradient_on_a_checkpoint_step_is_never_checkpointed(tmp_path, mlflow_uri, monkeypatch):
    # The loss of step 8 is finite, its gradient is not: the weights after step 8 are NaN, and step 8 is a
    # checkpoint step. Checking the loss alone would write them as the newest checkpoint.
    class NaNGradientAtStep8(UNet):
        def __init__(self, config):
            super().__init__(config)
            self.backward_calls = 0
            self.conv_out.bias.register_hook(self._poison)

        def _poison(self, grad):
            self.backward_calls += 1
            return grad * float("nan") if self.backward_calls == 8 else grad

    monkeypatch.setattr("tasks.train.UNet", NaNGradientAtStep8)
    params = load_params(setup_run(tmp_path, mlflow_uri, steps=20, log_every=10, checkpoint_every=4))
    with pytest.raises(TrainingError, match="NaN or inf at step 8"):
        train.run(params)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*/ckpt-*.pt")) == ["ckpt-00000004.pt"]
    (state,) = (torch.load(p, weights_only=True) for p in (tmp_path / "ckpt").glob("*/ckpt-00000004.pt"))
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.integration
def test_a_nan_that_only_rank_1_sees_stops_every_rank_before_the_next_checkpoint(tmp_path, mlflow_uri):
    params = setup_run(tmp_path, mlflow_uri, steps=12, batch_size=8, log_every=100, checkpoint_every=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    helper = Path(__file__).with_name("nan_on_one_rank.py")
    out = subprocess.run(
        [
            *(str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(helper), "6"),
            *("--result", str(result_file(params)), "--params", str(params)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode != 0
    prefix, message = "ddim train: error: ", "the loss or gradient became NaN or inf at step 6"
    assert out.stderr.count(prefix + message) == 2, f"both ranks stop at the same step:\n{out.stderr[-3000:]}"
    (error,) = read_result(params).values()  # the message of a rank's error line
    assert error.startswith(message) and prefix + error in out.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*/ckpt-*.pt")) == ["ckpt-00000004.pt"]


def test_model_pt_holds_only_the_model_and_a_rerun_rewrites_the_same_bytes(tmp_path, mlflow_uri):
    params_file = setup_run(tmp_path, mlflow_uri, steps=10)
    first = train.run(load_params(params_file))
    model_pt = tmp_path / "out" / "model.pt"
    state = torch.load(model_pt, weights_only=True)
    assert set(state) == {"format_version", "model_config", "ema", "diffusion", "step", "dataset_sha256", "source"}
    run = json.loads((tmp_path / "out" / "train_run.json").read_text())
    assert run["mlflow_run_id"] == first["mlflow_run_id"] and run["params"]["train"]["log_every"] == 5
    assert (run["device"], run["precision"]) == ("cpu", "fp32"), "what auto resolved to, not auto"
    tags = MlflowClient(tracking_uri=mlflow_uri).get_run(first["mlflow_run_id"]).data.tags
    assert (tags["device"], tags["precision"]) == ("cpu", "fp32")

    before = model_pt.read_bytes()
    model_pt.unlink()  # as `dvc repro` does before it reruns the stage
    settings = ["train.log_every=2", "train.num_workers=1", "train.checkpoint_every=3"]
    again = train.run(load_params(params_file, settings))
    assert again["resumed_from"] == 10 and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert model_pt.read_bytes() == before, "a settings change that cannot change the model leaves model.pt as it was"


@pytest.mark.integration
def test_sigterm_to_ddim_train_with_data_workers_checkpoints_and_says_so(tmp_path, mlflow_uri):
    params = setup_run(tmp_path, mlflow_uri, steps=100000, checkpoint_every=100000, log_every=1, num_workers=2)
    proc = subprocess.Popen(
        [str(BIN / "ddim"), "train", "--params", str(params)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        start_new_session=True,
    )
    deadline = time.time() + 240
    csv_path = tmp_path / "out" / "train_metrics.csv"
    while not (csv_path.exists() and len(csv_path.read_text().splitlines()) > 3) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, workers included, as DVC and Ctrl-C do
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("ddim train: error: stopped at step"), err[-3000:]
    assert "Traceback" not in err
    (saved,) = (tmp_path / "ckpt").glob("*/ckpt-*.pt")
    assert torch.load(saved, weights_only=True)["step"] >= 3


@pytest.mark.integration
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.batch_size=0", "train.batch_size: Input should be greater than or equal to 1"),
        ("train.precision=fp8", "train.precision: Input should be 'auto', 'bf16', 'fp16' or 'fp32'"),
        ("model.ch=48", "not divisible by num_groups=32"),
    ],
)
def test_invalid_train_config_fails_before_any_work(tmp_path, mlflow_uri, override, message):
    params = setup_run(tmp_path, mlflow_uri)
    with pytest.raises(ConfigError, match=message):
        load_params(params, [override])
    out = run_train(params, "--set", override, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().startswith("ddim train: error: invalid params:")
    assert len(out.stderr.strip().splitlines()) == 1
    assert read_result(params) == {"error": out.stderr.strip().removeprefix("ddim train: error: ")}
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


def test_a_dataset_smaller_than_a_batch_is_a_clear_error(tmp_path, mlflow_uri):
    params = load_params(setup_run(tmp_path, mlflow_uri, batch_size=256))
    with pytest.raises(TrainingError, match="fewer than one global batch"):
        train.run(params)


def test_more_steps_resume_but_a_changed_recipe_starts_over_in_its_own_folder(tmp_path, mlflow_uri):
    params_file = setup_run(tmp_path, mlflow_uri, steps=10)
    first = train.run(load_params(params_file))
    longer = train.run(load_params(params_file, ["train.steps=20"]))
    assert longer["resumed_from"] == 10 and longer["mlflow_run_id"] == first["mlflow_run_id"]
    # another recipe: its own folder
    changed = train.run(load_params(params_file, ["train.steps=20", "train.lr=0.002"]))
    assert changed["resumed_from"] == 0 and changed["mlflow_run_id"] != first["mlflow_run_id"]
    assert len(list((tmp_path / "ckpt").iterdir())) == 4  # two recipe folders and their locks


@pytest.mark.slow  # compiling takes about 40 s on 2 CPU cores
def test_train_compile_compiles_the_step_and_learns_what_eager_learns(tmp_path, mlflow_uri):
    params_file = setup_run(tmp_path, mlflow_uri, steps=6, log_every=3, checkpoint_every=3)
    compiled = train.run(load_params(params_file, ["train.compile=true"]))
    compiled_rows = metrics_rows(tmp_path)
    eager = train.run(load_params(params_file, ["train.resume=never", f"paths.checkpoints={tmp_path}/eager"]))
    for a, b in zip(compiled_rows, metrics_rows(tmp_path), strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-2)
    assert compiled["step"] == eager["step"] == 6


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])  # fp16 is slow on CPUs
def test_mixed_precision_trains_on_cpu(tmp_path, mlflow_uri, precision):
    summary = train.run(load_params(setup_run(tmp_path, mlflow_uri, steps=3, log_every=1, precision=precision)))
    assert summary["step"] == 3 and 0 < summary["loss"] < 10


def test_ddim_runs_table_keeps_the_newest_repeat_and_blanks_settings_of_other_samplers(tmp_path):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from tasks.common.config import TrackingConfig
    from tasks.common.tracking import compare_runs, log_evaluation

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="compare")
    client = MlflowClient(tracking_uri=cfg.uri)
    experiment_id = client.create_experiment("compare")
    parent = client.create_run(experiment_id, tags={"stage": "train"}).info.run_id
    client.log_metric(parent, "loss", 0.05)

    def evaluate(sampler: str, fid: float) -> None:
        sample = {"sampler": sampler, "steps": 50, "spacing": "quad", "base_step_size": 2.0, "eta": 1.0}
        ddim = sampler == "ddim"
        metrics = {"fid": fid, "num_samples": 8, "sampler": sampler, "steps": 50 if ddim else None, "eta": 1.0}
        metrics |= {"spacing": "quad" if ddim else None, "nfe": 49.0, "reference_count": 16}
        reference = tmp_path / "ref.npz"
        reference.write_bytes(b"statistics")
        log_evaluation(
            cfg,
            parent,
            {"sample": sample},
            metrics,
            tmp_path / "no-grid.png",
            model_sha256="0" * 64,
            reference=reference,
            clip_x0=True,
        )
        time.sleep(0.01)  # distinct start times

    evaluate("ddim", 90.0)
    evaluate("ddim", 80.0)  # the same evaluation again: only this newest one is shown
    evaluate("adaptive", 85.0)
    table = compare_runs(cfg)
    assert table["fid"].tolist() == [80.0, 85.0]
    adaptive = table.iloc[1]
    assert adaptive["sampler"] == "adaptive" and adaptive["base_step"] == "2.0"
    assert pd.isna(adaptive["steps"]) and pd.isna(adaptive["spacing"])
    assert table.iloc[0]["steps"] == "50" and pd.isna(table.iloc[0]["base_step"])


def test_update_ema_is_averaged_models_update_bit_for_bit():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from models.unet import UNetConfig
    from tasks.train import update_ema

    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()))
    theirs, ours = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) for _ in "ab")
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        theirs.update_parameters(model)
        update_ema(ours, model, 0.9, first=step == 0)
        assert all(
            torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values(), strict=True)
        )


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, mlflow_uri, monkeypatch):
    """A read of a device tensor on the host (bool, item, tolist, float) waits for the GPU: the step has none,
    so the GPU never idles between steps (the loop reads the loss only at log steps). Adam's step counters
    are exempt: they live on the CPU on every device."""
    from tasks.train import batches, build_trainer, train_step

    trainer = build_trainer(load_params(setup_run(tmp_path, mlflow_uri)))
    data = batches(trainer, 3)
    train_step(trainer, next(data)[1], 0)  # the first step (a copy into the EMA) and first-call set-up

    counters = {id(state["step"]) for state in trainer.optimizer.state.values()}

    refuse_host_reads(monkeypatch, counters)
    for step in (1, 2):
        train_step(trainer, next(data)[1], step)


@pytest.mark.integration
def test_two_machines_meet_at_a_rendezvous_and_train_as_two_ranks(tmp_path, mlflow_uri):
    """train.nnodes=2: two launchers (here both on 127.0.0.1, one process each, the checkpoints on a shared
    folder) meet through torchrun's c10d rendezvous and train exactly as one machine with two processes."""
    import socket

    from pipelines.flows import torchrun_launcher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = setup_run(tmp_path, mlflow_uri, steps=4, batch_size=8, log_every=2, checkpoint_every=2)
    nodes = ["train.nnodes=2", f"train.rdzv_endpoint=127.0.0.1:{port}", "train.rdzv_id=test"]
    launcher = torchrun_launcher(1, load_params(params, nodes).train)
    assert "--rdzv-backend=c10d" in launcher and "--nnodes=2" in launcher and "--standalone" not in launcher
    sets = [arg for item in nodes for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = [tmp_path / f"result-{machine}.json" for machine in "ab"]  # each machine's rank 0 would write its own
    machines = [
        subprocess.Popen(
            [*launcher, "-m", "pipelines.ranks", "train", "--result", str(result), "--params", str(params), *sets],
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        for result in results
    ]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0]
    assert all(no_summary_line(out) for out in outputs)
    summaries = [json.loads(r.read_text()) for r in results if r.is_file()]
    assert len(summaries) == 1, "one rank 0 in the job, on one of the machines"
    assert summaries[0]["ranks_in_sync"] is True and summaries[0]["step"] == 4

    # its own checkpoints: it must not continue the two machines' run
    one_machine = subprocess.run(
        [*torchrun_launcher(2), *rank(params, "--set", f"paths.checkpoints={tmp_path}/b")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert one_machine.returncode == 0, one_machine.stderr[-2000:]
    assert read_result(params)["weights_sha256"] == summaries[0]["weights_sha256"]


def test_sample_grids_come_at_their_own_steps_whatever_the_log_and_checkpoint_cadence(tmp_path, mlflow_uri):
    params = load_params(setup_run(tmp_path, mlflow_uri, steps=9, log_every=5, checkpoint_every=10, sample_every=3))
    summary = train.run(params)
    grids = {a.path for a in MlflowClient(tracking_uri=mlflow_uri).list_artifacts(summary["mlflow_run_id"], "samples")}
    assert grids == {f"samples/step_{s:08d}.png" for s in (3, 6, 9)}  # 3 and 6 were skipped before


def test_a_run_stopped_early_has_sent_what_it_logged_when_train_returns(tmp_path, mlflow_uri):
    summary = train.run(load_params(setup_run(tmp_path, mlflow_uri, steps=30, log_every=5)), stop_after=10)
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss")) == [5, 10]
    assert client.get_run(summary["mlflow_run_id"]).info.status == "RUNNING"  # to be resumed
