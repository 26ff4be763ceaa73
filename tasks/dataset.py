"""The prepared-dataset format, and its reader.

A prepared dataset is a folder ``<paths.prepared>/<data.name>/`` holding

- ``images.npy``: uint8 ``[N, H, W, 3]`` (NHWC), memory-mappable with ``np.load(..., mmap_mode="r")``;
- ``preview.png``: the first 64 images in an 8x8 grid;
- ``manifest.json``: source, split, count, height, width, channels, the sha256 of the array's bytes, the
  ``data`` params that define it, and how many input images were skipped.

The prepare stage (``tasks/data.py``) writes it; the train and reference stages read it through
:class:`PreparedDataset`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.config import DataConfig, PathsConfig
from tasks.errors import UserError

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


def load_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a prepared dataset (no {MANIFEST}): run `ddim prepare` first")
    return json.loads(path.read_text())


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
        if self.array.shape != expected:
            raise DataError(f"{self.root / ARRAY} has shape {self.array.shape}, manifest says {expected}")
        if verify and array_sha256(self.array) != self.manifest["sha256"]:
            raise DataError(f"{self.root / ARRAY} does not match its manifest's sha256: run `ddim prepare` again")

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.root / ARRAY, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.manifest["count"]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index])).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
