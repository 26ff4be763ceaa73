"""Small image helpers shared by the stages: tensors to uint8 images, grids, PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.common.files import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images ``[B, 3, H, W]`` in [-1, 1] (the prepared dataset's scaling) -> uint8 ``[B, H, W, 3]``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`to_uint8`: uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile ``images`` (uint8 ``[N, H, W, C]``) into one ``[rows*(H+p)+p, nrow*(W+p)+p, C]`` image."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty [N, H, W, C] array, got shape {images.shape}")
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a uint8 ``[H, W, C]`` (C = 1 or 3) array as a PNG, atomically."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def read_png(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]``."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
