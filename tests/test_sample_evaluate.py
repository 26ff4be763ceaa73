"""Sampling (seed-exact, resumable) and FID (offline weights, pytorch-fid agreement, numerics)."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_images
from mlflow.tracking import MlflowClient
from PIL import Image

from models.solvers import dpm_solver_sample, unipc_sample
from tasks import sample
from tasks.common.config import load_params
from tasks.common.fid import EvaluationError, fid_between, frechet_distance, statistics
from tasks.common.inception import InceptionError, install_fid_weights, weights_path


@pytest.mark.parametrize(
    "sampler",
    [
        ["sample.sampler=ddim", "sample.eta=0.0"],
        ["sample.sampler=ddim", "sample.eta=1.0"],
        ["sample.sampler=adaptive", "sample.eta=0.5", "sample.base_step_size=0.5", "sample.max_step=400"],
        ["sample.sampler=dpm-solver++", "sample.order=3"],
        ["sample.sampler=unipc", "sample.variant=bh1"],
    ],
    ids=["ddim-eta0", "ddim-eta1", "adaptive", "dpm-solver++", "unipc"],
)
def test_image_i_is_the_same_for_batch_sizes_3_and_8(trained, tmp_path, sampler):
    images = {}
    for bs in (3, 8):
        out = tmp_path / f"bs{bs}"
        params = load_params(trained, [*sampler, f"sample.batch_size={bs}", f"paths.samples={out}"])
        stats = sample.run(params)
        assert stats["complete"] and stats["num_samples"] == 8
        images[bs] = read_images(out, 8).astype(int)
    # Convolutions may pick other kernels for other batch sizes: allow one grey level of rounding, rarely.
    diff = np.abs(images[3] - images[8])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert not np.array_equal(images[3][0], images[3][1])


@pytest.mark.parametrize(
    ("sampler", "solve"),
    [
        ("dpm-solver++", lambda m, x, ac, ts: dpm_solver_sample(m, x, ac, ts, 3, clip_x0=True)),
        ("unipc", lambda m, x, ac, ts: unipc_sample(m, x, ac, ts, 3, "bh1", clip_x0=True)),
    ],
)
def test_the_sample_stage_draws_the_solvers_images_and_records_their_settings(trained, tmp_path, sampler, solve):
    from models.diffusion import ddim_timesteps
    from tasks.common.inference import load_for_sampling
    from tasks.common.seeds import derive_seed

    out = tmp_path / sampler
    overrides = [f"sample.sampler={sampler}", "sample.order=3", "sample.variant=bh1", f"paths.samples={out}"]
    params = load_params(trained, overrides)
    stats = sample.run(params)
    settings = {"steps": 5, "spacing": params.sample.spacing, "order": 3, "eta": None, "base_step_size": None}
    assert {k: stats[k] for k in settings} == settings and stats["variant"] == ("bh1" if sampler == "unipc" else None)
    assert stats["nfe_mean"] == len(ddim_timesteps(1000, 5, params.sample.spacing))
    model, ac = load_for_sampling(params, torch.device("cpu"))
    size, generator = model.config.image_size, torch.Generator().manual_seed(derive_seed(params.sample.seed, 2))
    x_T = torch.randn(1, 3, size, size, generator=generator)
    x0 = solve(model, x_T, ac, ddim_timesteps(1000, 5, params.sample.spacing))
    expected = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()[0]
    assert np.abs(read_images(out, 8)[2].astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.integration
def test_sampling_resumes_after_a_kill(trained, tmp_path):
    reference = tmp_path / "reference"
    sample.run(load_params(trained, ["sample.num_samples=120", "sample.batch_size=4", f"paths.samples={reference}"]))

    out = tmp_path / "killed"
    script = (
        "import sys; from tasks.common.config import load_params; from tasks import sample; "
        "sample.run(load_params(sys.argv[1], sys.argv[2:]))"
    )
    args = [str(trained), "sample.num_samples=120", "sample.batch_size=4", f"paths.samples={out}"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "images" / "000009.png").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sorted(p.name for p in (out / "images").glob("*.png"))
    assert 0 < len(before) < 120, "killed mid-run"
    for p in (out / "images").glob("*.png"):
        Image.open(p).load()  # every file on disk is a whole PNG

    stats = sample.run(load_params(trained, args[1:]))
    assert stats["complete"] and stats["images_generated_now"] < 120
    np.testing.assert_array_equal(read_images(out, 120), read_images(reference, 120))
    assert not list((out / "images").glob(".*")), "no temporary files left"
    # The folder (a DVC output) records what the images are, not how this run went: byte for byte the same.
    assert snapshot(out) == snapshot(reference)


def test_a_changed_sampling_config_starts_over(trained, tmp_path):
    out = tmp_path / "s"
    sample.run(load_params(trained, [f"paths.samples={out}", "sample.num_samples=4", "sample.batch_size=4"]))
    first = read_images(out, 4)
    stats = sample.run(
        load_params(trained, [f"paths.samples={out}", "sample.num_samples=4", "sample.batch_size=4", "sample.steps=3"])
    )
    assert stats["images_generated_now"] == 4
    assert not np.array_equal(read_images(out, 4), first)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_files_the_stage_did_not_write_is_refused_untouched(trained, tmp_path):
    """paths.samples pointed at a folder of other files (here one like results/, with train/model.pt in it)
    is one error, and every file in it stays as it was, also when its config.json is the stage's own."""
    from tasks.sample import SampleOutputError

    out = tmp_path / "results"
    sample.run(load_params(trained, [f"paths.samples={out}", "sample.num_samples=2"]))
    (out / "train").mkdir()
    (out / "train" / "model.pt").write_bytes(b"the user's model")
    (out / "images" / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(SampleOutputError, match=r"did not write \(images/notes.txt, train\): point paths.samples"):
        sample.run(load_params(trained, [f"paths.samples={out}", "sample.num_samples=2", "sample.steps=3"]))
    assert snapshot(out) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(SampleOutputError, match=r"config.json \(not written by ddim sample\)"):
        sample.run(load_params(trained, [f"paths.samples={mine}"]))
    assert snapshot(mine) == {"config.json": b'{"my": "settings"}'}
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SampleOutputError, match="is a file, not a folder"):
        sample.run(load_params(trained, [f"paths.samples={tmp_path / 'a-file'}"]))


@pytest.mark.integration
def test_ddim_sample_refuses_a_foreign_folder_with_one_line(trained, tmp_path):
    from helpers import cli_env

    out = tmp_path / "results"
    (out / "train").mkdir(parents=True)
    (out / "train" / "model.pt").write_bytes(b"the user's model")
    ddim = str(Path(sys.executable).with_name("ddim"))
    cli = subprocess.run(
        [ddim, "sample", "--params", str(trained), "--set", f"paths.samples={out}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert cli.stderr.strip().splitlines()[-1] == (
        f"ddim sample: error: paths.samples={out} holds files that ddim sample did not write (train): "
        "point paths.samples at a new or empty folder"
    )
    assert snapshot(out) == {"train/model.pt": b"the user's model"}


def test_starting_over_deletes_the_stages_files_and_leftovers_of_a_kill(trained, tmp_path):
    out = tmp_path / "s"
    sample.run(load_params(trained, [f"paths.samples={out}", "sample.num_samples=3"]))
    (out / "images" / ".000007.png.abc123.tmp").write_bytes(b"cut short by a kill")
    sample.run(load_params(trained, [f"paths.samples={out}", "sample.num_samples=2", "sample.steps=3"]))
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]


def test_a_model_trained_for_another_diffusion_is_refused(trained, tmp_path):
    from tasks.common.checkpoint import ModelFileError

    with pytest.raises(ModelFileError, match="was trained with diffusion=.*params say otherwise"):
        sample.run(load_params(trained, ["diffusion.beta_end=0.03", f"paths.samples={tmp_path / 's'}"]))
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # compiling on the CPU takes a while
def test_sample_compile_gives_the_eager_images(trained, tmp_path):
    """sample.compile=true (what auto does on CUDA) runs the compiled network and gives the eager images."""
    images = {}
    for mode in ("true", "false"):
        sample.run(load_params(trained, [f"sample.compile={mode}", f"paths.samples={tmp_path / mode}"]))
        images[mode] = read_images(tmp_path / mode, 8).astype(int)
    diff = np.abs(images["true"] - images["false"])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_sample_compile_auto_compiles_on_cuda_only(trained, monkeypatch):
    from tasks.common.inference import load_for_sampling

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    load_for_sampling(load_params(trained), torch.device("cpu"))
    assert compiled == []
    load_for_sampling(load_params(trained, ["sample.compile=true"]), torch.device("cpu"))
    assert len(compiled) == 1


def test_two_seeds_never_share_an_images_noise(trained, tmp_path):
    # With seed + i, seed 1's image 0 was seed 0's image 1 (eta 0: the same image).
    common = ["sample.num_samples=2", "sample.batch_size=2", "sample.eta=0.0"]
    sample.run(load_params(trained, [*common, "sample.seed=0", f"paths.samples={tmp_path / 'seed0'}"]))
    sample.run(load_params(trained, [*common, "sample.seed=1", f"paths.samples={tmp_path / 'seed1'}"]))
    seed0, seed1 = read_images(tmp_path / "seed0", 2), read_images(tmp_path / "seed1", 2)
    assert not np.array_equal(seed1[0], seed0[1]) and not np.array_equal(seed1[1], seed0[0])


def test_a_complete_rerun_changes_no_file_even_on_another_device_setting(trained, tmp_path):
    out = tmp_path / "s"
    overrides = [f"paths.samples={out}", "sample.num_samples=4", "sample.batch_size=4"]
    first = sample.run(load_params(trained, overrides))
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}
    again = sample.run(load_params(trained, [*overrides, "sample.device=cpu"]))  # runtime keys make no new images
    assert again.items() <= first.items()  # first also has its run's timing
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()} == files


@pytest.mark.slow  # Inception on the CPU
def test_evaluate_describes_the_images_it_scored_not_the_current_params(trained, tmp_path):
    from tasks import evaluate, reference

    overrides = [f"paths.samples={tmp_path / 's'}", f"paths.metrics={tmp_path / 'm.json'}", "sample.steps=5"]
    sample.run(load_params(trained, overrides))
    reference.run(load_params(trained))
    metrics = evaluate.run(load_params(trained, [*overrides[:2], "sample.steps=7", "sample.eta=0.3"]))
    assert (metrics["steps"], metrics["eta"]) == (5, 0.0)


# ----- FID


def test_weight_conversion_matches_the_torchscript_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    result = install_fid_weights()
    assert result["max_abs_feature_diff"] < 1e-4
    assert weights_path() == tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    state = torch.load(weights_path(), weights_only=True)
    assert len([k for k in state if k.endswith("conv.weight")]) == 94


def test_frechet_distance_against_a_hand_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 4)), rng.normal(size=(400, 4)) @ rng.normal(size=(4, 4)) + 0.5
    mu1, s1 = statistics(a)
    mu2, s2 = statistics(b)
    # ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), with symmetric square roots
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_is_pytorch_fids(recwarn):
    """Our copy of pytorch-fid's calculate_frechet_distance (which newer scipy releases break) gives its numbers,
    on well-conditioned and on singular covariances (where both add the same offset)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    for n, d in ((300, 16), (10, 64)):
        (mu1, s1), (mu2, s2) = statistics(rng.normal(size=(n, d))), statistics(rng.normal(size=(n, d)) + 0.2)
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                theirs = float(calculate_frechet_distance(mu1, s1, mu2, s2))
            except TypeError:  # sqrtm(..., disp=False) on a scipy without that argument
                pytest.skip("pytorch-fid's calculate_frechet_distance does not run on this scipy")
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-12, abs=1e-12)


def test_fid_numerics_small_sets_and_too_few_images(tmp_path):
    with pytest.raises(EvaluationError, match="at least 2 images"):
        statistics(np.zeros((1, 2048)))
    feats = np.random.default_rng(0).normal(size=(10, 64))  # fewer images than dimensions: singular sigma
    mu, sigma = statistics(feats)
    assert np.isfinite(frechet_distance(mu, sigma, mu + 0.1, sigma))  # singular covariances still give a number


def shapes_folder(folder: Path, seed: int, n: int = 12) -> Path:
    from tasks.prepare import shape_image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(shape_image(32, seed, i)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.integration
def test_fid_agrees_with_the_pytorch_fid_cli_and_is_zero_against_itself(tmp_path):
    a = shapes_folder(tmp_path / "a", seed=0)
    b = shapes_folder(tmp_path / "b", seed=1)
    with pytest.warns(UserWarning, match="biased"):
        ours = fid_between([a, b], batch_size=12)["fid"]
    cli = subprocess.run(
        [sys.executable, "-m", "pytorch_fid", str(a), str(b), "--device", "cpu", "--batch-size", "12"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    theirs = float(cli.stdout.strip().split("FID:")[-1])
    assert ours == pytest.approx(theirs, abs=1e-3)
    with pytest.warns(UserWarning):
        assert fid_between([a, a], batch_size=12)["fid"] == pytest.approx(0.0, abs=1e-3)


def test_missing_weights_name_the_fix(tmp_path, monkeypatch):
    from tasks.common import inception

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("pytorch_fid.inception.load_state_dict_from_url", offline)
    with pytest.raises(InceptionError, match="run `ddim fid-weights`"):
        inception.load_inception()


# ----- the three stages through their flows


@pytest.mark.integration
def test_sample_reference_evaluate_flows(prefect_server, trained):
    from pipelines.flows import FLOWS

    assert FLOWS["sample"](params_file=str(trained), return_state=True).is_completed()
    assert FLOWS["reference"](params_file=str(trained), return_state=True).is_completed()
    state = FLOWS["evaluate"](params_file=str(trained), return_state=True)
    assert state.is_completed()
    metrics = json.loads((trained.parent / "metrics.json").read_text())
    assert set(metrics) == {
        *("fid", "num_samples", "sampler", "steps", "eta", "spacing", "order", "variant", "base_step_size"),
        *("nfe", "reference_count"),
        *("precision", "device"),
    }
    assert (metrics["precision"], metrics["device"]) == ("fp32", "cpu"), "what auto resolved to, not auto"
    assert metrics["num_samples"] == 8 and metrics["reference_count"] == 16 and metrics["fid"] > 0

    params = load_params(trained)
    client = MlflowClient(tracking_uri=params.tracking.uri)
    parent = (Path(params.paths.train) / "mlflow_run_id").read_text().strip()
    child = client.get_run(state.result()["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.metrics["fid"] == pytest.approx(metrics["fid"])
    assert child.data.params["sample.steps"] == "5"
    assert "grid.png" in {a.path for a in client.list_artifacts(child.info.run_id)}


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state not in "ZX"  # a zombie has exited; only its exit status waits to be collected


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the server's parent-death signal is Linux's")
def test_sigterm_stops_ddim_sample_with_one_line_and_sigkill_leaves_no_server(trained, tmp_path):
    from helpers import cli_env

    out = tmp_path / "s"
    ddim = str(Path(sys.executable).with_name("ddim"))
    command = [ddim, "sample", "--params", str(trained), "--set", f"paths.samples={out}"]
    command += ["--set", "sample.num_samples=4000", "--set", "sample.steps=20"]

    def start_and_wait_for_images() -> subprocess.Popen:
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=cli_env())
        deadline = time.monotonic() + 120
        while not (out / "images" / "000008.png").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        return proc

    proc = start_and_wait_for_images()
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "ddim sample: stopped by SIGTERM: rerun the same command to finish"
    assert not (out / "sample_stats.json").exists()  # written only when the images are all there

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.monotonic() + 60
    while not (servers := _children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert servers, "the stage runs its own temporary Prefect server"
    time.sleep(3)  # the stage is under way
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in servers), "the temporary Prefect server outlived its killed stage"


def test_nothing_non_finite_passes_silently(trained, tmp_path):
    """NaN weights, NaN samples and NaN statistics are errors, never a black image or `FID: nan`."""
    from tasks.common.checkpoint import ModelFileError, load_model
    from tasks.common.config import ConfigError
    from tasks.common.inference import SamplingError, load_for_sampling, sample_images

    params = load_params(trained)
    model, alphas = load_for_sampling(params, torch.device("cpu"))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(SamplingError, match=r"images 0..1 came out NaN or infinite"):
        sample_images(model, alphas, params.sample, [0, 1], None)

    state = torch.load(Path(params.paths.train) / "model.pt", weights_only=True)
    state["ema"] = {k: torch.full_like(v, float("inf")) if k.endswith("bias") else v for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="holds NaN or infinite weights"):
        load_model(tmp_path / "model.pt")

    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(EvaluationError, match="NaN or infinite"):
        frechet_distance(mu, sigma, mu + np.nan, sigma)
    with pytest.raises(ConfigError, match="reference_count"):
        load_params(trained, ["evaluate.reference_count=-60"])


# ---------------------------------------------------------------------------------------------------------
# The latent space: ddim reconstruct, ddim interpolate
# ---------------------------------------------------------------------------------------------------------


def test_reconstruction_errors_per_image_do_not_depend_on_the_batch(trained, tmp_path):
    from tasks import reconstruct

    results = {}
    for bs in (3, 8):
        sets = [f"latent.batch_size={bs}", f"paths.latent={tmp_path / str(bs)}", "latent.num_images=8"]
        params = load_params(trained, [*sets, "latent.steps=[2, 8]", "sample.precision=fp32"])
        results[bs] = reconstruct.run(params)
    rows = {bs: {r["steps"]: r for r in result["rows"]} for bs, result in results.items()}
    for steps in (2, 8):
        # The same numbers to float rounding (convolutions pick other kernels for other batch sizes).
        assert rows[3][steps]["mse"] == pytest.approx(rows[8][steps]["mse"], rel=1e-4)
        assert rows[3][steps]["mse_max"] == pytest.approx(rows[8][steps]["mse_max"], rel=1e-4)
        assert rows[3][steps]["nfe"] == 2 * steps and rows[3][steps]["num_images"] == 8
    assert rows[8][8]["mse"] > 0  # (how it falls with S is tested in closed form: test_diffusion.py)
    out = tmp_path / "8"
    table = (out / "reconstruct.csv").read_text().splitlines()
    assert table[0] == "steps,spacing,nfe,mse,mse_max,paper_mse,num_images" and len(table) == 3
    assert json.loads((out / "reconstruct.json").read_text())["mse"].keys() == {"2", "8"}
    grid = np.asarray(Image.open(out / "reconstruct.png"))
    assert grid.shape == (3 * 18 + 2, 8 * 18 + 2, 3)  # originals, then a row per S; 16 px images, 2 px padding
    params = load_params(trained)
    client = MlflowClient(tracking_uri=params.tracking.uri)
    run = client.get_run(results[8]["run"])
    assert run.data.tags["stage"] == "reconstruct"
    assert run.data.tags["mlflow.parentRunId"] == (Path(params.paths.train) / "mlflow_run_id").read_text().strip()
    assert run.data.metrics["mse_S8"] == pytest.approx(rows[8][8]["mse"]) and run.data.metrics["seconds_S8"] > 0


def test_reconstruct_refuses_a_dataset_too_small_or_of_another_size(trained):
    from tasks import reconstruct
    from tasks.common.dataset import DataError

    with pytest.raises(DataError, match="holds 128 images, 500 are asked for"):
        reconstruct.run(load_params(trained, ["latent.num_images=500"]))


@pytest.mark.parametrize("endpoints", ["seeds", "images"])
def test_interpolation_grid_and_the_norms_along_each_path(trained, tmp_path, endpoints):
    from tasks import interpolate

    sets = [f"paths.latent={tmp_path}", "latent.pairs=2", "latent.frames=5", "latent.interpolate_steps=4"]
    result = interpolate.run(load_params(trained, [*sets, f"latent.endpoints={endpoints}"]))
    assert result["rows"] == ["pair 0: slerp", "pair 0: lerp", "pair 1: slerp", "pair 1: lerp"]
    grid = np.asarray(Image.open(tmp_path / "interpolation.png"))
    assert grid.shape == (4 * 18 + 2, 5 * 18 + 2, 3)
    record = json.loads((tmp_path / "interpolation.json").read_text())
    norms = np.array(record["latent_norm_per_sqrt_dim"])
    slerp_rows, lerp_rows = norms[0::2], norms[1::2]
    np.testing.assert_allclose(slerp_rows[:, 0], lerp_rows[:, 0])  # the same ends
    np.testing.assert_allclose(slerp_rows[:, -1], lerp_rows[:, -1])
    if endpoints == "seeds":  # Gaussian ends: the arc keeps their norm, the line's middle is ~0.71 of it
        assert np.all(np.abs(slerp_rows - 1) < 0.1) and np.all(np.abs(lerp_rows[:, 2] - 0.71) < 0.1)
