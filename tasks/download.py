"""Downloads: once, atomically, with a progress bar, verified against a checksum where one is known."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from tasks.errors import UserError
from tasks.files import atomic_path, file_hash

# Hugging Face states the sha256 of a large (LFS) file in this header of its download response.
SHA256_HEADER = "X-Linked-Etag"


class DownloadError(UserError):
    """A download failed or did not verify; ``status`` is the HTTP status of a refused request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def fetch(
    url: str, dest: Path, *, offline_hint: str, checksum: tuple[str, str] | None = None, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    ``checksum`` is ``(algorithm, hexdigest)`` when known (``("md5", ...)`` for CIFAR-10); otherwise a sha256
    the server states for the file is checked. An existing ``dest`` is reused when it verifies (or, with no
    checksum known, when it exists). A failed or corrupt download leaves nothing at ``dest``; a failure names
    ``url`` and, with ``offline_hint``, how to do without the network.
    """
    if dest.is_file() and (checksum is None or file_hash(dest, checksum[0]) == checksum[1]):
        return dest
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                stated = re.fullmatch(r'"?([0-9a-f]{64})"?', response.headers.get(SHA256_HEADER) or "")
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            status = e.code if isinstance(e, urllib.error.HTTPError) else None
            message = f"could not download {url} ({getattr(e, 'reason', e)}); {offline_hint}"
            raise DownloadError(message, status) from None
        expected = checksum or (("sha256", stated.group(1)) if stated else None)
        if expected is not None and (got := file_hash(tmp, expected[0])) != expected[1]:
            raise DownloadError(
                f"download of {url} has {expected[0]} {got}, expected {expected[1]}: it is corrupt or truncated; rerun"
            )
    return dest
