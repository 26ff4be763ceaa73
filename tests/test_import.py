"""`ddim import-model` and the train stage's pretrained mode: every kind of SOURCE, downloads against a server
on 127.0.0.1, and every way an import can go wrong."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from helpers import SMALL, diffusers_to_ddpm_names, setup_run

import tasks.common.pretrained as importer
from models.unet import UNetConfig
from pipelines.cli import main
from tasks.common.checkpoint import load_model
from tasks.common.download import DownloadError
from tasks.common.pretrained import ModelImportError
from tasks.import_model import run as import_model

SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


@pytest.fixture(scope="module")
def small_diffusers(tmp_path_factory):
    """(the model, a folder with its safetensors, a folder with its .bin), each with a scheduler config."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("diffusers")
    model.save_pretrained(root / "st")
    model.save_pretrained(root / "bin", safe_serialization=False)
    for folder in ("st", "bin"):
        (root / folder / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, "num_train_timesteps": 1000}))
    return model, root / "st", root / "bin"


def same_eps(model_pt: Path, diffusers_model) -> float:
    ours, _ = load_model(model_pt)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 900])
    with torch.no_grad():
        return (ours(x, t) - diffusers_model(x, t).sample).abs().max().item()


@pytest.mark.parametrize("which", ["st", "bin"])
def test_a_diffusers_folder(small_diffusers, tmp_path, which):
    model, st, bin_ = small_diffusers
    folder = st if which == "st" else bin_
    out = tmp_path / "model.pt"
    result = import_model(str(folder), out, tmp_path / "cache")
    assert same_eps(out, model) < 2e-5
    state = torch.load(out, weights_only=True)
    assert state["source"] == {
        "kind": "import",
        "from": str(folder),
        "layout": "diffusers",
        "file": result["file"],
        "sha256": hashlib.sha256((folder / result["file"]).read_bytes()).hexdigest(),
        "weights": f"{result['file']}: whether these are EMA weights is not known",
    }
    assert state["diffusion"] == {"schedule": "linear", "num_train_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert UNetConfig.from_dict(state["model_config"]).ch_mult == (1, 2)


def test_an_original_ddpm_checkpoint_file(small_diffusers, tmp_path):
    model, _, _ = small_diffusers
    ckpt = tmp_path / "model-790000.ckpt"
    torch.save(diffusers_to_ddpm_names(model.state_dict(), levels=2), ckpt)
    with pytest.raises(ModelImportError, match="does not record its image size"):
        import_model(str(ckpt), tmp_path / "model.pt", tmp_path / "cache")
    import_model(str(ckpt), tmp_path / "model.pt", tmp_path / "cache", image_size=16)
    assert same_eps(tmp_path / "model.pt", model) < 2e-5
    assert torch.load(tmp_path / "model.pt", weights_only=True)["source"]["layout"] == "ddpm"


class Hub(http.server.SimpleHTTPRequestHandler):
    """Serves ``<root>/<owner>/<name>/<file>`` at ``/<owner>/<name>/resolve/main/<file>``, stating a sha256
    for .safetensors files as Hugging Face does; records every path asked for."""

    requests: list[str]
    sha256: dict[str, str]

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.replace("/resolve/main/", "/"))

    def end_headers(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name in self.sha256:
            self.send_header("X-Linked-Etag", f'"{self.sha256[name]}"')
        super().end_headers()

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub on 127.0.0.1 (HF_ENDPOINT points at it): (the folder it serves, its request log, its sha256s)."""
    root = tmp_path / "hub-files"
    root.mkdir()
    handler = type("TestHub", (Hub,), {"requests": [], "sha256": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield root, handler.requests, handler.sha256
    server.shutdown()
    server.server_close()


def publish(folder: Path, hub_root: Path, repo: str, files: tuple[str, ...]) -> None:
    (hub_root / repo).mkdir(parents=True)
    for name in files:
        (hub_root / repo / name).write_bytes((folder / name).read_bytes())


def test_a_hub_id_is_downloaded_once_and_checked(small_diffusers, tmp_path, hub):
    model, st, _ = small_diffusers
    root, requests, sha256 = hub
    files = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")
    publish(st, root, "google/ddpm-tiny", files)
    sha256["diffusion_pytorch_model.safetensors"] = hashlib.sha256((st / files[1]).read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    import_model("google/ddpm-tiny", tmp_path / "a.pt", cache)
    assert same_eps(tmp_path / "a.pt", model) < 2e-5
    downloaded = cache / "hub" / "google--ddpm-tiny"
    assert sorted(downloaded.iterdir()) == sorted(downloaded / f for f in files)
    asked = len(requests)
    import_model("google/ddpm-tiny", tmp_path / "b.pt", cache)
    assert len(requests) == asked, "the second import reads the cache"

    publish(st, root, "google/ddpm-corrupt", files)
    sha256["diffusion_pytorch_model.safetensors"] = "0" * 64
    with pytest.raises(DownloadError, match="has sha256 .* expected 0000"):
        import_model("google/ddpm-corrupt", tmp_path / "c.pt", cache)
    assert not (cache / "hub" / "google--ddpm-corrupt" / files[1]).exists(), "nothing half-downloaded is kept"


def test_a_hub_model_with_only_a_bin_file(small_diffusers, tmp_path, hub):
    model, _, bin_ = small_diffusers
    root, requests, _ = hub
    publish(bin_, root, "owner/old-model", ("config.json", "diffusion_pytorch_model.bin"))
    import_model("owner/old-model", tmp_path / "m.pt", tmp_path / "cache")
    assert same_eps(tmp_path / "m.pt", model) < 2e-5
    assert any(r.endswith(".safetensors") for r in requests) and any(r.endswith(".bin") for r in requests)


def test_a_url_of_a_known_checkpoint_is_md5_checked(small_diffusers, tmp_path, hub, monkeypatch):
    model, _, _ = small_diffusers
    root, _, _ = hub
    torch.save(diffusers_to_ddpm_names(model.state_dict(), levels=2), root / "ema.ckpt")
    url = f"{os.environ['HF_ENDPOINT']}/ema.ckpt"
    monkeypatch.setitem(importer.KNOWN_FILES, url, ("ema-16px.ckpt", "0" * 32, 16, 0.0))
    with pytest.raises(DownloadError, match="has md5 .* expected 0000"):
        import_model(url, tmp_path / "m.pt", tmp_path / "cache")
    md5 = hashlib.md5((root / "ema.ckpt").read_bytes()).hexdigest()
    monkeypatch.setitem(importer.KNOWN_FILES, url, ("ema-16px.ckpt", md5, 16, 0.0))
    import_model(url, tmp_path / "m.pt", tmp_path / "cache")  # the image size comes from the known file
    assert same_eps(tmp_path / "m.pt", model) < 2e-5


def test_offline_the_error_says_which_files_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(DownloadError) as error:
        import_model("google/ddpm-cifar10-32", tmp_path / "m.pt", tmp_path / "cache")
    message = str(error.value)
    assert "http://127.0.0.1:9/google/ddpm-cifar10-32/resolve/main/config.json" in message
    assert f"put them in {tmp_path / 'cache' / 'hub' / 'google--ddpm-cifar10-32'}/" in message


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_foreign_and_hostile_files_are_one_clear_error(small_diffusers, tmp_path, capfd):
    _, st, _ = small_diffusers
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(ModelImportError, match="not an original-layout DDPM U-Net"):
        import_model(str(foreign), tmp_path / "m.pt", tmp_path / "cache", image_size=32)
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"conv_in.weight": Evil()}))
    with pytest.raises(ModelImportError, match="is not a readable checkpoint"):
        import_model(str(evil), tmp_path / "m.pt", tmp_path / "cache", image_size=32)
    assert "must never run" not in capfd.readouterr().out, "nothing is unpickled that could run code"
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((st / "config.json").read_text())
    weights = "diffusion_pytorch_model.safetensors"
    (truncated / weights).write_bytes((st / weights).read_bytes()[:999])
    with pytest.raises(ModelImportError, match="is not a readable checkpoint"):
        import_model(str(truncated), tmp_path / "m.pt", tmp_path / "cache")
    with pytest.raises(ModelImportError, match="not a folder, a file, an https URL, a hub id"):
        import_model("no such thing", tmp_path / "m.pt", tmp_path / "cache")


def test_ddim_import_model_writes_where_the_train_stage_would_and_never_over_a_users_file(
    small_diffusers, tmp_path, capsys, monkeypatch
):
    _, st, _ = small_diffusers
    monkeypatch.chdir(tmp_path)
    assert main(["import-model", str(st)]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "results/train/model.pt"
    assert load_model(tmp_path / "results" / "train" / "model.pt")[1]["source"]["kind"] == "import"
    assert main(["import-model", str(st)]) == 0, "a model.pt of ours may be replaced"
    (tmp_path / "notes.pt").write_text("my notes")
    assert main(["import-model", str(st), "--out", "notes.pt"]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("ddim import-model: error: notes.pt exists and is not a model.pt of this pipeline")
    )
    assert (tmp_path / "notes.pt").read_text() == "my notes"


def test_the_train_stage_imports_instead_of_training_when_model_pretrained_is_set(small_diffusers, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks import train
    from tasks.common.config import load_params
    from tasks.train import TrainingError

    model, st, _ = small_diffusers
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params_file = setup_run(tmp_path, mlflow_uri)  # the micro U-Net: the same shape as the imported one
    summary = train.run(load_params(params_file, [f"model.pretrained={st}"]))
    assert same_eps(tmp_path / "out" / "model.pt", model) < 2e-5
    assert summary["imported_from"] == str(st) and not list((tmp_path / "ckpt").glob("ckpt-*.pt")), "no training"
    run = json.loads((tmp_path / "out" / "train_run.json").read_text())
    assert run["source"]["layout"] == "diffusers" and run["mlflow_run_id"] == summary["mlflow_run_id"]
    mlflow_run = MlflowClient(tracking_uri=mlflow_uri).get_run(summary["mlflow_run_id"])
    tags = mlflow_run.data.tags
    assert tags["stage"] == "train" and tags["source"] == str(st) and mlflow_run.info.run_name == f"import-{st.name}"
    assert (tmp_path / "out" / "train_metrics.csv").read_text().startswith("step,loss")

    with pytest.raises(TrainingError, match=r"is another U-Net: ch=32 \(params: 64\)"):
        train.run(load_params(params_file, [f"model.pretrained={st}", "model.ch=64"]))


def test_the_import_says_plainly_whether_it_holds_ddpms_ema_weights(small_diffusers, tmp_path, hub, capsys):
    """google/ddpm-cifar10-32 (here a small model published under that id on the local hub) is reported not to be
    the EMA model: the output says so and names the EMA checkpoint to import instead."""
    _, st, _ = small_diffusers
    root, _, _ = hub
    publish(st, root, "google/ddpm-cifar10-32", ("config.json", "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "m.pt"
    assert main(["import-model", "google/ddpm-cifar10-32", "--out", str(out), "--set", f"paths.raw={tmp_path}"]) == 0
    printed = capsys.readouterr()
    weights = json.loads(printed.out)["weights"]
    assert weights.startswith("google/ddpm-cifar10-32 is reported not to hold DDPM's EMA weights")
    assert importer.EMA_CIFAR10_URL in weights and printed.err.strip().splitlines()[-1] == f"weights: {weights}"
    assert load_model(out)[1]["source"]["weights"] == weights
    assert importer.which_weights("x", "ema_diffusion_cifar10_model-790000.ckpt").endswith(
        "DDPM's EMA weights, the ones its FIDs were computed with"
    )
    assert "not their EMA" in importer.which_weights("x", "diffusion_cifar10_model-790000.ckpt")
