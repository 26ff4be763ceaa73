"""`ddim export-model`: model.pt as a diffusers pipeline folder that diffusers loads and runs as ours does, and
that `ddim import-model` reads back bit for bit; and every way an export can be refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.diffusion import alphas_cumprod_from_betas, ddim_sample, ddim_timesteps, make_beta_schedule
from models.unet import UNet, UNetConfig
from pipelines.cli import main
from tasks import export_model
from tasks.common.checkpoint import load_model, save_model
from tasks.import_model import run as import_model

CONFIG = UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)


def diffusion(schedule: str) -> dict:
    return {"schedule": schedule, "num_train_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


def write_model(path: Path, schedule: str = "linear") -> Path:
    """A model.pt of the micro U-Net with weights off their initial values (zero-initialised layers included)."""
    torch.manual_seed(0)
    model = UNet(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(path, CONFIG, model.state_dict(), diffusion=diffusion(schedule), step=7, dataset_sha256="ab", source={})
    return path


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_export_then_import_gives_back_the_same_weights_and_diffusion(tmp_path, schedule):
    model_pt = write_model(tmp_path / "model.pt", schedule)
    result = export_model.run(model_pt, tmp_path / "out")
    assert result["step"] == 7 and result["out"] == str(tmp_path / "out")
    import_model(str(tmp_path / "out"), tmp_path / "back.pt", tmp_path / "cache")
    before = torch.load(model_pt, weights_only=True)
    after = torch.load(tmp_path / "back.pt", weights_only=True)
    assert after["model_config"] == before["model_config"] and after["diffusion"] == before["diffusion"]
    assert after["ema"].keys() == before["ema"].keys()
    assert all(torch.equal(after["ema"][k], before["ema"][k]) for k in before["ema"]), "bit for bit"


def test_diffusers_runs_the_export_as_we_run_model_pt(tmp_path):
    from diffusers import DDIMPipeline, UNet2DModel

    model_pt = write_model(tmp_path / "model.pt")
    export_model.run(model_pt, tmp_path / "out")
    ours, _ = load_model(model_pt)
    theirs = UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 411, 999])
    with torch.no_grad():
        assert (theirs(x, t).sample - ours(x, t)).abs().max() < 1e-5, "eps to float32 rounding"

    pipe = DDIMPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=3,
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=10,
        eta=0.0,
        use_clipped_model_output=True,
        output_type="np",
    ).images
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))  # the pipeline's own draw
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000))
    with torch.no_grad():
        x0 = ddim_sample(ours, x_T, alphas_cumprod, ddim_timesteps(1000, 10, "uniform"), eta=0.0, clip_x0=True)
    mine = ((x0 / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert images.shape == (3, 16, 16, 3)
    assert np.abs(images - mine).max() < 1e-4, "diffusers' DDIM loop from the same x_T gives our images"
    assert pipe.scheduler.timesteps.tolist() == ddim_timesteps(1000, 10, "uniform").tolist()


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_second_export_replaces_the_first_and_nothing_else_is_ever_written_over(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_model(tmp_path / "model.pt")
    assert main(["export-model", "out", "--model", "model.pt"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "model.pt"
    assert main(["export-model", "out", "--model", "model.pt"]) == 0, "an earlier export is replaced"
    capsys.readouterr()

    (tmp_path / "out" / "mine").mkdir()  # an empty folder of the user's is theirs too
    assert main(["export-model", "out", "--model", "model.pt"]) == 1
    assert "out holds files that ddim export-model did not write (mine)" in last_error(capsys)
    (tmp_path / "out" / "mine").rmdir()
    (tmp_path / "out" / "unet" / "notes.txt").write_text("mine")
    assert main(["export-model", "out", "--model", "model.pt"]) == 1
    assert last_error(capsys).startswith(
        "ddim export-model: error: out holds files that ddim export-model did not write (unet/notes.txt)"
    )
    assert (tmp_path / "out" / "unet" / "notes.txt").read_text() == "mine"

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "model_index.json").write_text("{}")
    assert main(["export-model", "theirs", "--model", "model.pt"]) == 1
    assert "theirs holds files that ddim export-model did not write (model_index.json)" in last_error(capsys)
    assert (tmp_path / "theirs" / "model_index.json").read_text() == "{}"

    (tmp_path / "a-file").write_text("x")
    assert main(["export-model", "a-file", "--model", "model.pt"]) == 1
    assert "a-file is a file: give a folder" in last_error(capsys)


def test_a_foreign_or_missing_model_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    assert main(["export-model", "out", "--model", "foreign.pt"]) == 1
    assert last_error(capsys).startswith("ddim export-model: error: foreign.pt has no model_config and ema entries")
    assert main(["export-model", "out"]) == 1, "the default is the train stage's model.pt"
    assert last_error(capsys).startswith("ddim export-model: error: results/train/model.pt not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "foreign.pt"], "no folder, half or whole"


def test_an_export_cut_short_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    model_pt = write_model(tmp_path / "model.pt")
    export_model.run(model_pt, tmp_path / "out")
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_model.run(model_pt, tmp_path / "out")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "model.pt", "out"], "no staging folder left"
