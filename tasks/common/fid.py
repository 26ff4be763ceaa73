"""FID as pytorch-fid computes it: Inception features of image files or arrays, statistics, the distance.

Images go in as pytorch-fid's CLI reads them (uint8 RGB scaled to [0, 1]); its ``InceptionV3``
(``tasks/common/inception.py``) resizes to 299 x 299 and maps to [-1, 1]. Features are computed in fp32, batched,
under ``torch.inference_mode``. Statistics files are ``.npz`` with pytorch-fid's keys ``mu`` and ``sigma``
(plus ``count``), so ``python -m pytorch_fid`` reads ours and ``ddim evaluate A B`` reads its.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tasks.common.config import Params
from tasks.common.errors import UserError
from tasks.common.files import atomic_path
from tasks.common.inception import DIMS, load_inception
from tasks.common.progress import progress_bar

FID_IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's list


class EvaluationError(UserError):
    """FID cannot be computed from these inputs."""


class ImageFiles(Dataset):
    """Image files as pytorch-fid's CLI reads them: RGB, ``[3, H, W]`` float in [0, 1]."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            with Image.open(self.files[i]) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways to refuse a file
            raise EvaluationError(f"cannot read image {self.files[i]} ({e}): remove it or replace it") from None
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


def batch_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 2048]`` float64 pool3 features of images ``[B, 3, H, W]`` in [0, 1] (uint8 / 255, as pytorch-fid
    reads a file), on the model's device. Every FID here goes through this one call, so the same pixels give
    the same features whether they come from files or straight from the sampler."""
    device = next(model.parameters()).device
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        x = pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return model(x)[0].flatten(1).double()


def inception_features(
    dataset: Dataset, model: torch.nn.Module, batch_size: int, num_workers: int = 0, progress: bool = True
) -> np.ndarray:
    """``[N, 2048]`` float64 pool3 features of every image in ``dataset``, ``batch_size`` per Inception call (the
    evaluate section's)."""
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = np.empty((len(dataset), DIMS), dtype=np.float64)
    i = 0
    try:
        for batch in progress_bar(loader, desc="inception", unit="batch", disable=not progress, leave=False):
            feats = batch_features(model, batch).cpu().numpy()
            out[i : i + len(feats)] = feats
            i += len(feats)
    except EvaluationError as e:  # from a DataLoader worker, torch puts the worker's traceback in the message
        if "Original Traceback" not in str(e):
            raise
        raise EvaluationError(str(e).strip().splitlines()[-1].split("EvaluationError: ", 1)[-1]) from None
    return out


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` as pytorch-fid computes them (``np.cov`` with ``rowvar=False``)."""
    if len(features) < 2:
        raise EvaluationError(f"FID needs at least 2 images, got {len(features)}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


class FeatureStats:
    """Mean and covariance of Inception features, accumulated batch by batch without keeping the features.

    Batches (and the statistics of other processes, :meth:`reduce`) are merged with Chan et al.'s pairwise
    update of the mean and the sum of squared deviations, which keeps the covariance as accurate as
    ``np.cov`` of all the features at once (plain sums of ``x x^T`` lose digits to cancellation). Float64,
    on the features' device.
    """

    def __init__(self, dims: int = DIMS, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(dims, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dims, dims, dtype=torch.float64, device=device)  # sum of (x - mean)(x - mean)^T

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.m2 += m2 + torch.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def add(self, features: torch.Tensor) -> None:
        """Add ``[B, dims]`` features."""
        f = features.to(torch.float64)
        if len(f):
            mean = f.mean(dim=0)
            self._merge(len(f), mean, (f - mean).T @ (f - mean))

    def reduce(self) -> None:
        """Merge the statistics of every process, in rank order (under torch.distributed; alone: nothing)."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        parts = []
        for tensor in (torch.tensor([float(self.count)], device=self.mean.device), self.mean, self.m2):
            gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, tensor)
            parts.append(gathered)
        self.count, self.mean, self.m2 = 0, torch.zeros_like(self.mean), torch.zeros_like(self.m2)
        for count, mean, m2 in zip(*parts, strict=True):
            if count.item() > 0:
                self._merge(int(count.item()), mean, m2)

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` as :func:`statistics` gives them for the same features."""
        if self.count < 2:
            raise EvaluationError(f"FID needs at least 2 images, got {self.count}")
        return self.mean.cpu().numpy(), (self.m2 / (self.count - 1)).cpu().numpy()


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), computed as pytorch-fid's ``calculate_frechet_distance``
    computes it (scipy's ``sqrtm``; ``eps`` on the diagonals when the product is singular; a negligible
    imaginary part dropped). Our own copy: pytorch-fid 0.3.0 passes ``sqrtm`` an argument that newer scipy
    releases no longer accept."""
    from scipy import linalg

    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise EvaluationError(f"statistics of different sizes: {mu1.shape} and {mu2.shape}")
    if not all(np.isfinite(x).all() for x in (mu1, mu2, sigma1, sigma2)):
        raise EvaluationError("the Inception statistics hold NaN or infinite values: recompute them (delete the .npz)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's notes on ill-conditioned products; the check below decides
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            imaginary = np.abs(covmean.imag).max()
            raise EvaluationError(f"the FID's matrix square root has an imaginary part of {imaginary:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    fid = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    if not np.isfinite(fid):
        raise EvaluationError(f"the FID came out as {fid}: the statistics are degenerate")
    return fid


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
    """``(mu, sigma, count)`` of an ``.npz`` of Inception statistics (pytorch-fid's keys; ``count`` is ours)."""
    if not Path(path).is_file():
        raise EvaluationError(f"Inception statistics {path} not found: run `ddim reference` first")
    if not zipfile.is_zipfile(path):
        raise EvaluationError(f"{path} is not an .npz file (a zip of arrays mu and sigma): compute it again")
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = np.asarray(f["mu"], dtype=np.float64), np.asarray(f["sigma"], dtype=np.float64)
            count = int(f["count"]) if "count" in f else None
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as e:
        raise EvaluationError(
            f"{path} is not an .npz of Inception statistics with arrays mu and sigma ({e}): compute it again"
        ) from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvaluationError(f"{path} holds mu {mu.shape} and sigma {sigma.shape}: not statistics; compute it again")
    return mu, sigma, count


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


def fid_between(paths: Iterable[Path], device: str = "cpu", *, batch_size: int, num_workers: int = 0) -> dict[str, Any]:
    """FID between two folders and/or ``.npz`` files, like ``python -m pytorch_fid P1 P2`` (``batch_size``: images
    per Inception call, the evaluate section's)."""
    p1, p2 = list(paths)
    for path in (p1, p2):  # a bad path fails before Inception loads
        if Path(path).suffix == ".npz":
            load_stats(path)
        elif Path(path).is_dir():
            list_images(path)
    model = load_inception(device)
    mu1, s1, n1 = stats_of(p1, model, batch_size, num_workers)
    mu2, s2, n2 = stats_of(p2, model, batch_size, num_workers)
    for n in (n1, n2):
        if n:
            warn_if_biased(n)
    return {"fid": frechet_distance(mu1, s1, mu2, s2), "count_1": n1, "count_2": n2}


def reference_path(params: Params) -> Path:
    return Path(params.paths.reference) / f"{params.data.name}.npz"
