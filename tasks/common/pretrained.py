"""Released DDPM weights read as the pipeline's ``model.pt``: for ``ddim import-model SOURCE``
(``tasks/import_model.py``) and for the train stage when ``model.pretrained`` is set.

SOURCE is one of:

- a diffusers model folder: ``config.json`` with ``diffusion_pytorch_model.safetensors`` (or ``.bin``), and
  ``scheduler_config.json`` if there is one (a pipeline folder's ``unet/`` and ``scheduler/`` work too);
- an original DDPM / pytorch_diffusion checkpoint file (a state dict: ``temb.dense.0``, ``down.1.attn.0.q``,
  ...), as ermongroup/ddim loads them;
- a Hugging Face hub id such as ``google/ddpm-cifar10-32`` (fetched from ``$HF_ENDPOINT``, default
  https://huggingface.co), or an https URL of a checkpoint file. Downloads go once into ``<paths.raw>/models``;
  the known DDPM files are MD5-checked, hub files against the sha256 the hub states;
- an MLflow logged model of this pipeline (:mod:`tasks.common.logged_model`), as a folder or a URI such as
  ``models:/ddim-cifar10@champion`` (downloaded afresh from the tracking store: an alias moves).

Nothing is unpickled that could run code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.diffusion import make_beta_schedule
from models.unet import UNetConfig
from models.weights import WeightsError, convert_state_dict, ddpm_config_from_state_dict, unet_config_from_diffusers
from tasks.common.checkpoint import is_model_file, load_model, save_model
from tasks.common.config import TrackingConfig
from tasks.common.download import DownloadError, fetch
from tasks.common.errors import UserError, first_line
from tasks.common.files import file_hash
from tasks.common.logged_model import LOGGED_MODEL_FILE
from tasks.common.tracking import mlflow_client, tracking_uri

HUB_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# DDPM's own checkpoints, converted to PyTorch by pytorch_diffusion (the files ermongroup/ddim downloads):
# url -> (file name, md5, image size, dropout). EMA weights are what DDPM's FIDs are computed with.
KNOWN_FILES = {
    "https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1": (
        "ema_diffusion_cifar10_model-790000.ckpt", "1fa350b952534ae442b1d5235cce5cd3", 32, 0.1),
    "https://heibox.uni-heidelberg.de/f/869980b53bf5416c8a28/?dl=1": (
        "diffusion_cifar10_model-790000.ckpt", "82ed3067fd1002f5cf4c339fb80c4669", 32, 0.1),
    "https://heibox.uni-heidelberg.de/f/b95206528f384185889b/?dl=1": (
        "ema_diffusion_lsun_bedroom_model-2388000.ckpt", "1921fa46b66a3665e450e42f36c2720f", 256, 0.0),
    "https://heibox.uni-heidelberg.de/f/0701aac3aa69457bbe34/?dl=1": (
        "ema_diffusion_lsun_cat_model-1761000.ckpt", "646f23f4821f2459b8bafc57fd824558", 256, 0.0),
    "https://heibox.uni-heidelberg.de/f/44ccb50ef3c6436db52e/?dl=1": (
        "ema_diffusion_lsun_church_model-4432000.ckpt", "fdc68a23938c2397caba4a260bc2445f", 256, 0.0),
}  # fmt: skip
EMA_CIFAR10_URL = next(
    url for url, known in KNOWN_FILES.items() if known[0] == "ema_diffusion_cifar10_model-790000.ckpt"
)
# Hub models said, by people who converted DDPM's original checkpoints themselves, to hold the raw weights of the
# last step rather than their EMA (VainF/Diff-Pruning; pesser/pytorch_diffusion#3: FID ~12 against ~4.8 with EMA).
HUB_NOT_EMA = {"google/ddpm-cifar10-32": EMA_CIFAR10_URL}
# Every DDPM model was trained with these betas.
DDPM_DIFFUSION = {"schedule": "linear", "num_train_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


class ModelImportError(UserError):
    """The source cannot be imported."""


@dataclass
class Imported:
    """A U-Net's config and our state dict, the diffusion it was trained for, and where it came from."""

    config: UNetConfig
    state: dict[str, torch.Tensor]
    diffusion: dict[str, Any]
    source: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------------------


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _fetch_hub(repo: str, cache: Path) -> Path:
    """The hub model ``repo`` as a local diffusers folder: config.json, the weights, the scheduler config."""
    folder = cache / "hub" / repo.replace("/", "--")
    base = f"{_hub_endpoint()}/{repo}/resolve/main"
    hint = (
        f"offline, fetch {base}/config.json and {base}/{HUB_FILES[1]} (or .bin) elsewhere, put them in "
        f"{folder}/ and pass that folder as the source"
    )
    fetch(f"{base}/config.json", folder / "config.json", offline_hint=hint)
    try:
        fetch(f"{base}/{HUB_FILES[1]}", folder / HUB_FILES[1], offline_hint=hint)
    except DownloadError as no_safetensors:
        if no_safetensors.status != 404:
            raise
        fetch(f"{base}/{HUB_FILES[2]}", folder / HUB_FILES[2], offline_hint=hint)
    with contextlib.suppress(DownloadError):  # optional: without it the diffusion is DDPM's
        fetch(f"{base}/scheduler_config.json", folder / "scheduler_config.json", offline_hint=hint)
    return folder


def _fetch_url(url: str, cache: Path) -> Path:
    name, md5, _, _ = KNOWN_FILES.get(url, (None, None, None, None))
    name = name or re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").split("/")[-1].split("?")[0]) or "checkpoint"
    folder = cache / "url" / hashlib.sha256(url.encode()).hexdigest()[:16]
    hint = f"offline, fetch it elsewhere and pass the file as the source, or put it at {folder / name}"
    return fetch(url, folder / name, offline_hint=hint, checksum=("md5", md5) if md5 else None)


def _fetch_mlflow(uri: str, cache: Path, tracking: TrackingConfig) -> Path:
    """The MLflow model ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/<model id>``,
    ``runs:/...``) downloaded afresh (an alias moves) from the store ``tracking`` names into ``cache``."""
    import shutil

    import mlflow.artifacts

    store = tracking_uri(tracking)
    folder = cache / "mlflow" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    shutil.rmtree(folder, ignore_errors=True)  # only ever written here, by this function
    folder.mkdir(parents=True)
    try:
        location = _model_location(mlflow_client(store), uri)  # through this store, with its short retries
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(folder), tracking_uri=store)
        )
    except Exception as e:
        raise ModelImportError(f"{uri} cannot be fetched from MLflow at {store} ({first_line(e)})") from None


def _model_location(client: Any, uri: str) -> str:
    """Where the artifacts of the MLflow model ``uri`` are (a ``runs:/`` URI is one already)."""
    if uri.startswith("runs:/"):
        return uri
    ref = uri.removeprefix("models:/").strip("/")
    if "@" in ref:
        source = client.get_model_version_by_alias(*ref.split("@", 1)).source
    elif "/" in ref:
        source = client.get_model_version(*ref.rsplit("/", 1)).source
    else:
        source = f"models:/{ref}"  # a logged model's id
    if source.startswith("models:/"):  # a version registered from a logged model: its own location
        source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return source


def locate(source: str, cache: Path, tracking: TrackingConfig | None = None) -> Path:
    """A local folder or file for ``source``, downloading into ``cache`` what is not local."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if re.match(r"(models|runs):/", source):
        return _fetch_mlflow(source, cache, tracking or TrackingConfig())
    if re.match(r"https?://", source):
        return _fetch_url(source, cache)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
        return _fetch_hub(source, cache)
    raise ModelImportError(
        f"{source!r} is not a folder, a file, an https URL, a hub id (owner/name) or an MLflow models:/ URI: "
        f"e.g. google/ddpm-cifar10-32, a diffusers folder or models:/ddim-cifar10@champion"
    )


# ---------------------------------------------------------------------------------------------------------
# Reading them
# ---------------------------------------------------------------------------------------------------------


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling anything but tensors and containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file, or one with objects weights_only refuses
        why = (
            "it holds Python objects besides tensors, which are never loaded: they could run code"
            if "Weights only load failed" in str(e)
            else first_line(e)
        )
        raise ModelImportError(f"{path} is not a readable checkpoint ({why})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelImportError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _diffusion_of(folder: Path) -> dict[str, Any]:
    """The diffusion a diffusers model was trained for, from its scheduler config (DDPM's without one)."""
    for path in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if path.is_file():
            cfg = json.loads(path.read_text())
            diffusion = {
                "schedule": "linear",
                "num_train_steps": int(cfg.get("num_train_timesteps", 1000)),
                "beta_start": float(cfg.get("beta_start", 1e-4)),
                "beta_end": float(cfg.get("beta_end", 0.02)),
            }
            if cfg.get("trained_betas") and _is_our_cosine(cfg["trained_betas"]):  # as `ddim export-model` writes
                return {**diffusion, "schedule": "cosine"}
            if cfg.get("beta_schedule", "linear") != "linear" or cfg.get("trained_betas"):
                raise ModelImportError(
                    f"{path}: beta_schedule {cfg.get('beta_schedule')!r}; only linear (and the cosine schedule "
                    "that ddim export-model writes as trained_betas) is supported"
                )
            return diffusion
    return dict(DDPM_DIFFUSION)


def _is_our_cosine(betas: list[float]) -> bool:
    """Whether ``betas`` are, to the last bit, :func:`models.diffusion.make_beta_schedule`'s cosine schedule."""
    try:
        return make_beta_schedule("cosine", len(betas)).tolist() == [float(b) for b in betas]
    except (TypeError, ValueError):  # not a list of numbers
        return False


def _read_diffusers(folder: Path) -> tuple[UNetConfig, dict[str, torch.Tensor], Path, dict[str, Any]]:
    if (folder / "unet" / "config.json").is_file():  # a whole pipeline: its U-Net
        folder = folder / "unet"
    weights = next((folder / n for n in HUB_FILES[1:] if (folder / n).is_file()), None)
    if not (folder / "config.json").is_file() or weights is None:
        raise ModelImportError(f"{folder} is not a diffusers model folder: it needs config.json and {HUB_FILES[1]}")
    config = unet_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    return config, _load_tensors(weights), weights, _diffusion_of(folder)


def _read_ddpm_file(path: Path, image_size: int | None) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    foreign = _load_tensors(path)
    known = next((v for v in KNOWN_FILES.values() if v[0] == path.name), None)
    size = image_size or (known[2] if known else None)
    if size is None:
        raise ModelImportError(f"{path} does not record its image size: give it (32 for CIFAR-10, 256 for LSUN)")
    return ddpm_config_from_state_dict(foreign, size, dropout=known[3] if known else 0.0), foreign


def which_weights(source: str, file_name: str) -> str:
    """In words, which of DDPM's weights ``source`` holds, as far as is known: its FIDs are the EMA weights'."""
    ema_source = HUB_NOT_EMA.get(source.rstrip("/"))
    if ema_source is not None:
        return (
            f"{source} is reported not to hold DDPM's EMA weights (FID about 8-12 rather than DDPM's 3.17; not "
            f"checked here): for DDPM's numbers import the EMA checkpoint, ddim import-model '{ema_source}'"
        )
    known = next((v for v in KNOWN_FILES.values() if v[0] == file_name), None)
    if known is None:
        return f"{file_name}: whether these are EMA weights is not known"
    if known[0].startswith("ema_"):
        return f"{file_name}: DDPM's EMA weights, the ones its FIDs were computed with"
    return f"{file_name}: DDPM's raw weights of the last step, not their EMA (its FIDs are the EMA weights')"


def _read_logged_model(folder: Path) -> Imported:
    """An MLflow logged model of this pipeline (:mod:`tasks.common.logged_model`): its ``model.pt``, as it is."""
    model_pt = folder / LOGGED_MODEL_FILE
    model, state = load_model(model_pt)
    about = {"layout": "mlflow", "file": model_pt.name, "sha256": file_hash(model_pt), "step": state.get("step")}
    return Imported(model.config, model.state_dict(), dict(state["diffusion"]), about)


def read_source(
    source: str, cache: Path, image_size: int | None = None, tracking: TrackingConfig | None = None
) -> Imported:
    """Import ``source``; ``image_size`` is needed for original-layout files (they do not record it), ``tracking``
    for an MLflow model URI (default: the project's store, or ``MLFLOW_TRACKING_URI``)."""
    path = locate(source, cache, tracking)
    if (path / LOGGED_MODEL_FILE).is_file():
        imported = _read_logged_model(path)
        imported.source = {"from": source, **imported.source, "weights": "the EMA weights of this pipeline's run"}
        return imported
    try:
        if path.is_dir():
            config, foreign, weights, diffusion = _read_diffusers(path)
            layout = "diffusers"
        else:
            config, foreign = _read_ddpm_file(path, image_size)
            weights, diffusion, layout = path, DDPM_DIFFUSION, "ddpm"
        state = convert_state_dict(foreign, config, layout)
    except WeightsError as e:
        raise ModelImportError(f"{source}: {e}") from None
    about = {"from": source, "layout": layout, "file": weights.name, "sha256": file_hash(weights)}
    about["weights"] = which_weights(source, weights.name)
    return Imported(config, state, dict(diffusion), about)


def write_imported(imported: Imported, out: Path) -> None:
    """``imported`` as the pipeline's ``model.pt`` at ``out``: a file there is replaced only if it is one."""
    if out.exists() and not is_model_file(out):
        raise ModelImportError(f"{out} exists and is not a model.pt of this pipeline: choose another --out, or move it")
    about = {"diffusion": imported.diffusion, "step": None, "dataset_sha256": None}
    save_model(out, imported.config, imported.state, **about, source={"kind": "import", **imported.source})
