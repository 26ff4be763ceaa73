"""The prepare stage: download, import or synthesize images into a prepared dataset (``tasks/common/dataset.py``
describes the format and reads it).

The folder is built under a hidden temporary name and renamed into place only when complete, so an error or
a crash never leaves anything at the final path that looks like a dataset.

Sources (``data.source``):

- ``cifar10``: the official ``cifar-10-python.tar.gz`` (downloaded, or ``data.archive``), MD5-checked before
  anything in it is unpickled, read straight from the archive (nothing is extracted to disk).
- ``folder``: a directory (recursive) or ``.zip`` of png/jpg/jpeg/webp/bmp images of any mode and size;
  converted to RGB, center-cropped to a square and resized to ``data.image_size``. CelebA-HQ goes here.
- ``shapes``: a deterministic synthetic set of one colored circle, square or triangle per image.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import tarfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from tasks.common.config import CIFAR10_URL, DataConfig, Params, PathsConfig
from tasks.common.dataset import (
    ARRAY,
    FORMAT_VERSION,
    MANIFEST,
    PREVIEW,
    DataError,
    array_sha256,
    dataset_dir,
    load_manifest,
)
from tasks.common.download import DownloadError, fetch
from tasks.common.files import file_hash, foreign_entries, write_json
from tasks.common.images import make_grid, save_png
from tasks.common.progress import progress_bar

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# ---------------------------------------------------------------------------------------------------------
# Writing a prepared dataset
# ---------------------------------------------------------------------------------------------------------


OWN_DATASET_FILES = re.compile("|".join(map(re.escape, (ARRAY, MANIFEST, PREVIEW))) + r"|\..+\.tmp")


def check_replaceable(final: Path) -> None:
    """Refuse to replace ``final`` unless it is a prepared dataset of this pipeline (or absent or empty): the
    swap below deletes the old folder, and a folder of anything else is not ours to delete."""
    if not final.exists():
        return
    if not final.is_dir():
        raise DataError(f"{final} is a file, not a prepared dataset: choose another data.name or paths.prepared")
    foreign = foreign_entries(final, OWN_DATASET_FILES)
    try:
        recognised = not any(final.iterdir()) or "format_version" in load_manifest(final)
    except (DataError, OSError, UnicodeDecodeError, ValueError, TypeError):
        recognised = False
    if foreign or not recognised:
        what = ", ".join(foreign[:3]) if foreign else f"no {MANIFEST} of this pipeline"
        raise DataError(
            f"{final} is not a prepared dataset of this pipeline ({what}) and preparing would replace it: "
            "choose another data.name or paths.prepared"
        )


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Build a directory under a hidden temporary name; swap it onto ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left behind by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ArrayWriter:
    """Stream ``[H, W, 3]`` uint8 images into a memory-mapped ``.npy`` without holding them in memory."""

    def __init__(self, path: Path, capacity: int, size: int) -> None:
        self.path, self.count = path, 0
        needed, free = capacity * size * size * 3, shutil.disk_usage(path.parent).free
        if needed > free:  # a sparse file of that size may not even be possible (EINVAL), let alone fill
            raise DataError(
                f"{capacity:,} images of {size}x{size} take {needed / 1e9:,.1f} GB, more than the "
                f"{free / 1e9:,.1f} GB free in {path.parent.parent}: lower data.count, or free some space"
            )
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(capacity, size, size, 3))

    def append(self, image: np.ndarray) -> None:
        self.array[self.count] = image
        self.count += 1

    def finish(self) -> np.ndarray:
        """Flush, shrink the file to the images actually written, and return the array (read-only map)."""
        self.array.flush()
        if self.count < len(self.array):
            shrunk_path = self.path.with_suffix(".shrunk.npy")
            shrunk = np.lib.format.open_memmap(
                shrunk_path, mode="w+", dtype=np.uint8, shape=(self.count, *self.array.shape[1:])
            )
            for start in range(0, self.count, 4096):
                stop = min(start + 4096, self.count)
                shrunk[start:stop] = self.array[start:stop]
            shrunk.flush()
            del shrunk
            os.replace(shrunk_path, self.path)
        del self.array
        return np.load(self.path, mmap_mode="r")


def open_source(
    data: DataConfig, paths: PathsConfig, archive: Path | None, cifar10_md5: str
) -> tuple[int, Iterator[np.ndarray], dict[str, Any]]:
    """The source's image count, an iterator over its images (uint8 ``[size, size, 3]``, unreadable ones
    skipped or raised as ``data.on_bad_image`` says), and what the manifest should record about it."""
    if data.source == "shapes":
        assert data.count is not None  # validated by DataConfig
        return data.count, (shape_image(data.image_size, data.seed, i) for i in range(data.count)), {}
    if data.source == "cifar10":
        if archive is None and data.archive is not None:
            archive = verify_md5(Path(data.archive), cifar10_md5)
        elif archive is None:
            archive = download(data.url, cifar10_archive_path(paths), cifar10_md5)
        array = read_cifar10(archive, data.split)[: data.count]
        return len(array), (resize_square(a, data.image_size) for a in array), {"archive_md5": cifar10_md5}
    assert data.path is not None
    source = ImageSource.open(Path(data.path))
    files = source.files[: data.count]
    images = source.decode(files, data)
    return len(files), images, {"files": len(files)}


def run(params: Params, *, archive: Path | None = None) -> dict[str, Any]:
    """The prepare stage: the dataset of the data section (``archive``: CIFAR-10 already downloaded by
    :func:`cifar10_download`'s fetch, with retries); return its manifest."""
    return build_dataset(params.data, params.paths, archive=archive)


def cifar10_download(params: Params) -> tuple[str, Path, str] | None:
    """What the stage downloads before it runs (url, file, md5): CIFAR-10's archive, unless one is given."""
    data = params.data
    if data.source != "cifar10" or data.archive is not None:
        return None
    return data.url or CIFAR10_URL, cifar10_archive_path(params.paths), CIFAR10_MD5


def build_dataset(
    data: DataConfig, paths: PathsConfig, *, archive: Path | None = None, cifar10_md5: str = CIFAR10_MD5
) -> dict[str, Any]:
    """Build the prepared dataset that ``data`` describes and return its manifest.

    ``archive``: a CIFAR-10 archive already downloaded and verified (the flow downloads in a task of its
    own, with retries); by default ``data.archive`` is verified, or the archive is downloaded here.
    ``cifar10_md5`` exists so tests can serve a small archive; production uses the real MD5.
    """
    start = time.perf_counter()
    check_replaceable(dataset_dir(data, paths))
    capacity, images, extra = open_source(data, paths, archive, cifar10_md5)
    with atomic_directory(dataset_dir(data, paths)) as tmp:
        writer = ArrayWriter(tmp / ARRAY, capacity, data.image_size)
        for image in progress_bar(images, total=capacity, desc=f"prepare {data.name}", unit="img", leave=False):
            writer.append(image)
        array = writer.finish()
        if len(array) == 0:
            raise DataError(f"no readable images in {data.path}: all {capacity} failed to decode")
        save_png(make_grid(np.asarray(array[:64])), tmp / PREVIEW)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": data.name,
            "source": data.source,
            "split": data.split if data.source == "cifar10" else None,
            "count": len(array),
            "height": data.image_size,
            "width": data.image_size,
            "channels": 3,
            "dtype": "uint8",
            "layout": "NHWC",
            "sha256": array_sha256(array),
            "skipped": capacity - len(array),
            **extra,
            "params": data.model_dump(mode="json", include=set(data.result_keys())),  # what defines the data
        }
        del array
        write_json(manifest, tmp / MANIFEST)
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------------


def cifar10_archive_path(paths: PathsConfig) -> Path:
    return Path(paths.raw) / CIFAR10_ARCHIVE


def verify_md5(path: Path, md5: str) -> Path:
    """Return ``path`` if its MD5 is ``md5``; otherwise raise naming the problem and the fix."""
    if not path.exists():
        raise DataError(f"archive {path} does not exist: fix data.archive, or set it to null to download")
    if not path.is_file():
        raise DataError(f"archive {path} is not a regular file: point data.archive at {CIFAR10_ARCHIVE}")
    got = file_hash(path, "md5")
    if got != md5:
        raise DataError(
            f"{path} has md5 {got}, expected {md5}: it is corrupt, truncated or not {CIFAR10_ARCHIVE}; "
            f"delete it and download again"
        )
    return path


def download(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download the CIFAR-10 archive ``url`` to ``dest`` with a progress bar and verify its MD5.

    An existing ``dest`` with the right MD5 is reused. A failed or corrupt download leaves nothing at ``dest``.
    """
    try:
        hint = "offline: download it elsewhere and set data.archive"
        return fetch(url, dest, offline_hint=hint, checksum=("md5", md5), timeout=timeout)
    except DownloadError as e:
        error = DataError(str(e))
        error.retryable = e.retryable
        raise error from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches hold only numpy arrays, lists and bytes: refuse to construct anything else."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar10(archive: Path, split: str) -> np.ndarray:
    """The ``split`` ("train": 50,000, "test": 10,000) of a CIFAR-10 python archive as uint8 NHWC."""
    parts = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for batch in CIFAR10_BATCHES[split]:
                member = tar.extractfile(f"cifar-10-batches-py/{batch}")
                if member is None:
                    raise KeyError(batch)
                entry = _NumpyOnlyUnpickler(io.BytesIO(member.read()), encoding="bytes").load()
                parts.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    except KeyError as e:
        raise DataError(f"{archive} has no {e.args[0]}: it is not {CIFAR10_ARCHIVE}") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError, ValueError) as e:
        raise DataError(f"{archive} is truncated or corrupt ({e.__class__.__name__}: {e}); download it again") from None
    return np.ascontiguousarray(np.concatenate(parts).transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------------------
# Image folders and zips
# ---------------------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: EXIF rotation applied, transparency composited onto white, 16-bit scaled."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" or img.mode in ("LA", "PA", "RGBA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_square(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square, resize to ``size`` x ``size``; return uint8 ``[size, size, 3]``.

    The filter is PIL's bicubic, which antialiases when downscaling (PIL widens the kernel by the scale
    factor, unlike a plain bicubic sample): no aliasing on CelebA-HQ's 1024 -> 64 px, less ringing than
    Lanczos on sharp edges, and the filter that the clean-FID study recommends for FID work.
    """
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    w, h = img.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


@dataclass
class ImageSource:
    """The images of a directory (recursive) or a zip file, in sorted path order."""

    root: Path
    files: list[str]
    is_zip: bool

    @classmethod
    def open(cls, root: Path) -> ImageSource:
        if not root.exists():
            raise DataError(f"data.path {root} does not exist: point it at a directory or .zip of images")
        if not root.is_dir() and not root.is_file():
            raise DataError(f"data.path {root} is a device, pipe or socket: point it at a directory or .zip of images")
        if root.is_dir():
            files = sorted(
                str(p.relative_to(root))
                for p in root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            is_zip = False
        elif zipfile.is_zipfile(root):
            with zipfile.ZipFile(root) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
            for name in names:
                _check_member_name(root, name)
            files = sorted(n for n in names if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS)
            is_zip = True
        else:
            raise DataError(f"data.path {root} is neither a directory nor a .zip file")
        if not files:
            raise DataError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}: point data.path at the image folder or zip"
            )
        return cls(root, files, is_zip)

    def decode(self, files: list[str], data: DataConfig) -> Iterator[np.ndarray]:
        """Yield each readable image as uint8 ``[size, size, 3]`` (``data.image_size``), decoded by ``data.workers``
        processes; a bad one (unreadable, or over ``data.max_file_bytes`` or ``data.max_image_pixels``) raises or
        is skipped with a warning, as ``data.on_bad_image`` says."""
        job = _DecodeJob(str(self.root), self.is_zip, data)
        results: Iterable[tuple[str, np.ndarray | None, str]]
        if data.workers > 0:
            pool = ProcessPoolExecutor(max_workers=data.workers)
            results = pool.map(job, files, chunksize=16)
        else:
            pool, results = None, map(job, files)
        skipped = 0
        try:
            for name, image, problem in results:
                if image is not None:
                    yield image
                    continue
                if data.on_bad_image == "fail":
                    raise DataError(
                        f"cannot read image {name} in {self.root} ({problem}); remove it, or set data.on_bad_image=skip"
                    )
                skipped += 1
                warnings.warn(f"skipping unreadable image {name} ({problem})", stacklevel=2)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if skipped:
            warnings.warn(f"skipped {skipped} of {len(files)} images in {self.root}", stacklevel=2)


def _check_member_name(archive: Path, name: str) -> None:
    """Refuse zips whose member names are absolute or climb out of the archive root (zip-slip)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DataError(f"{archive} holds a member named {name!r} that escapes the archive; refusing to import it")


class _TooBigError(Exception):
    """An input over ``data.max_file_bytes`` or ``data.max_image_pixels``."""


class _DecodeJob:
    """Picklable decode function for worker processes; each worker keeps its own zip handle open.

    What one input image may cost is bounded by ``data.max_file_bytes`` (its file or zip member) and
    ``data.max_image_pixels`` (decoded): beyond them it is a bad image, so a hostile folder or zip (a 1 GiB
    member of a 1 MB zip, a 20,000 x 20,000 PNG of a few KB) cannot take the machine's memory."""

    def __init__(self, root: str, is_zip: bool, data: DataConfig) -> None:
        self.root, self.is_zip, self.size = root, is_zip, data.image_size
        self.max_bytes, self.max_pixels = data.max_file_bytes, data.max_image_pixels
        self._zip: zipfile.ZipFile | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}

    def _read(self, name: str) -> bytes:
        """The file's bytes, read into memory (nothing from a zip is written to disk), at most the limit: a zip
        member's stated size is checked first and its stream is cut there, in case the header lies."""
        cap = self.max_bytes
        if self.is_zip:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.root)
            stated = self._zip.getinfo(name).file_size
            if stated > cap:
                raise _TooBigError(f"{stated:,} bytes, over data.max_file_bytes = {cap:,}")
            with self._zip.open(name) as f:
                data = f.read(cap + 1)
        else:
            with open(Path(self.root) / name, "rb") as f:
                data = f.read(cap + 1)
        if len(data) > cap:
            raise _TooBigError(f"over data.max_file_bytes = {cap:,} bytes")
        return data

    def __call__(self, name: str) -> tuple[str, np.ndarray | None, str]:
        try:
            quiet = warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning)
            with quiet, Image.open(io.BytesIO(self._read(name))) as img:  # the header only; the limit decides
                w, h = img.size
                if w * h > self.max_pixels:
                    raise _TooBigError(f"{w} x {h} pixels, over data.max_image_pixels = {self.max_pixels:,}")
                img.load()
                return name, resize_square(to_rgb(img), self.size), ""
        except _TooBigError as e:
            return name, None, f"too big: {e}"
        except UnidentifiedImageError:
            return name, None, "not an image format PIL can read"
        except Image.DecompressionBombError as e:  # PIL's own limit, twice its default
            return name, None, f"too big: {e} (see data.max_image_pixels)"
        except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            return name, None, f"{e.__class__.__name__}: {e}"


# ---------------------------------------------------------------------------------------------------------
# Synthetic shapes
# ---------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
_SUPERSAMPLE = 4


def _contrasting_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random color at least 160 away from ``background`` in RGB, so every shape is plainly visible."""
    for _ in range(100):
        color = rng.integers(0, 256, 3)
        if np.linalg.norm(color - background) >= 160:
            return color
    return 255 - background


def shape_image(size: int, seed: int, index: int) -> np.ndarray:
    """Image ``index`` of the shapes dataset with ``seed``: uint8 ``[size, size, 3]``.

    One circle, square or triangle (upright) of random size (24-70 % of the image), position and color on a
    random solid or two-color gradient background. Drawn at 4x and box-filtered down, so edges are
    antialiased. Each image has its own random stream, so image i is the same whatever the count.
    """
    rng = np.random.default_rng([seed, index])
    big = size * _SUPERSAMPLE
    bg = rng.integers(0, 256, 3)
    if rng.random() < 0.3:  # a gentle gradient towards a nearby color
        bg2 = np.clip(bg + rng.integers(-60, 61, 3), 0, 255)
        ramp = np.linspace(0.0, 1.0, big)[:, None, None]
        canvas = (bg[None, None, :] * (1 - ramp) + bg2[None, None, :] * ramp).repeat(big, axis=1)
        if rng.random() < 0.5:
            canvas = canvas.transpose(1, 0, 2)
        img = Image.fromarray(canvas.astype(np.uint8))
    else:
        img = Image.new("RGB", (big, big), tuple(int(c) for c in bg))
    color = tuple(int(c) for c in _contrasting_color(rng, bg))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    half = rng.uniform(0.12, 0.35) * big
    cx, cy = rng.uniform(half, big - half, 2)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=color)
    elif kind == "square":
        side = half * 0.9
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=color)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half * 0.8), (cx + half, cy + half * 0.8)], fill=color)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
