"""The prepared-dataset format, and its reader.

A prepared dataset is a folder ``<paths.prepared>/<data.name>/`` holding

- ``images.npy``: uint8 ``[N, H, W, 3]`` (NHWC), memory-mappable with ``np.load(..., mmap_mode="r")``;
- ``preview.png``: the first 64 images in an 8x8 grid;
- ``manifest.json``: source, split, count, height, width, channels, the sha256 of the array's bytes, the
  ``data`` params that define it, and how many input images were skipped.

The prepare stage (``tasks/prepare.py``) writes it; the train and reference stages read it through
:class:`PreparedDataset`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.common.config import DataConfig, PathsConfig
from tasks.common.errors import UserError

MANIFEST = "manifest.json"
ARRAY = "images.npy"
PREVIEW = "preview.png"
FORMAT_VERSION = 1


class DataError(UserError):
    """A dataset source or a prepared dataset is missing, corrupt or empty."""


def dataset_dir(data: DataConfig, paths: PathsConfig) -> Path:
    return Path(paths.prepared) / data.name


def array_sha256(array: np.ndarray, chunk: int = 4096) -> str:
    """sha256 of the array's bytes in C order (the data, not the .npy header)."""
    h = hashlib.sha256()
    for start in range(0, len(array), chunk):
        h.update(np.ascontiguousarray(array[start : start + chunk]).data)
    return h.hexdigest()


MANIFEST_KEYS = ("format_version", "count", "height", "width", "sha256")


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of the prepared dataset ``root``; a missing, unreadable or foreign one is a DataError."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a prepared dataset (no {MANIFEST}): run `ddim prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is not JSON ({e}): run `ddim prepare` again") from None
    if not isinstance(manifest, dict) or any(k not in manifest for k in MANIFEST_KEYS):
        raise DataError(f"{path} is not a manifest of `ddim prepare` (no {', '.join(MANIFEST_KEYS)}): prepare again")
    return manifest


class PreparedDataset(torch.utils.data.Dataset):
    """A prepared dataset as float tensors in [-1, 1], ``[3, H, W]``.

    The array is memory-mapped lazily in each process, so the dataset pickles cheaply into DataLoader
    workers. Augmentation (random flips) is the training step's business, not the reader's.
    """

    def __init__(self, root: str | Path, verify: bool = False) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self._array: np.ndarray | None = None
        expected = (self.manifest["count"], self.manifest["height"], self.manifest["width"], 3)
        if self.array.shape != expected or self.array.dtype != np.uint8:
            found = f"{self.array.dtype} {self.array.shape}"
            raise DataError(f"{self.root / ARRAY} holds {found}, its manifest says uint8 {expected}: prepare again")
        if verify and array_sha256(self.array) != self.manifest["sha256"]:
            raise DataError(f"{self.root / ARRAY} does not match its manifest's sha256: run `ddim prepare` again")

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            try:
                self._array = np.load(self.root / ARRAY, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:  # truncated, not .npy, or gone
                what = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise DataError(f"{self.root / ARRAY} cannot be read ({what}): run `ddim prepare` again") from None
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.manifest["count"]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index])).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class DeviceImages:
    """A prepared dataset held in device memory as its uint8 array; :meth:`batch` gathers a batch by index there.

    The floats are the ones :class:`PreparedDataset` yields (``x / 127.5 - 1``), read from a 256-entry table
    computed on the CPU, so a batch is the DataLoader's bit for bit on any device. CIFAR-10's 50,000 images are
    150 MB: a GPU holds them next to training, and no loader process or host copy is left in each step."""

    def __init__(self, dataset: PreparedDataset, device: torch.device) -> None:
        self.images = torch.from_numpy(np.array(dataset.array)).to(device).permute(0, 3, 1, 2)
        self.table = torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0).to(device)

    @staticmethod
    def fits(dataset: PreparedDataset, device: torch.device, share: float = 0.25) -> bool:
        """Whether the array takes at most ``share`` of the CUDA device's free memory (never off CUDA)."""
        return device.type == "cuda" and dataset.array.nbytes <= share * torch.cuda.mem_get_info(device)[0]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Images ``indices`` (a LongTensor on the device) as floats ``[B, 3, H, W]`` in [-1, 1]."""
        return self.table[self.images[indices].long()]


def first_images(root: str | Path, count: int, image_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The first ``count`` images (uint8 NHWC, in memory) of the prepared dataset ``root``, and its manifest;
    an error if it holds fewer, or images of another size than ``image_size`` (the model's)."""
    dataset = PreparedDataset(root)
    if len(dataset) < count:
        raise DataError(f"{dataset.root} holds {len(dataset)} images, {count} are asked for: prepare more or ask fewer")
    if dataset.manifest["height"] != image_size:
        raise DataError(f"{dataset.root} holds {dataset.manifest['height']} px images, the model makes {image_size} px")
    return np.array(dataset.array[:count]), dataset.manifest
