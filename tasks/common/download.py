"""Downloads: once, atomically, with a progress bar, verified against a checksum where one is known."""

from __future__ import annotations

import http.client
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

from tasks.common.errors import UserError
from tasks.common.files import atomic_path, file_hash
from tasks.common.progress import progress_bar

# Hugging Face states the sha256 of a large (LFS) file in this header of its download response.
SHA256_HEADER = "X-Linked-Etag"


class DownloadError(UserError):
    """A download failed or did not verify; ``status`` is the HTTP status of a refused request."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status, self.retryable = status, retryable


def _transient(e: Exception) -> bool:
    """Whether a failed request may succeed later: a timeout, a dropped or refused connection, a cut-off
    transfer, or an HTTP status that says "later" (408, 429, 5xx). Not: an unknown host, a 4xx, a bad URL."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in (408, 429) or e.code >= 500
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, socket.gaierror):
        return False
    return isinstance(reason, TimeoutError | ConnectionError | http.client.HTTPException)


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
                with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            status = e.code if isinstance(e, urllib.error.HTTPError) else None
            message = f"could not download {url} ({getattr(e, 'reason', e) or e.__class__.__name__}); {offline_hint}"
            raise DownloadError(message, status, retryable=_transient(e)) from None
        expected = checksum or (("sha256", stated.group(1)) if stated else None)
        if expected is not None and (got := file_hash(tmp, expected[0])) != expected[1]:
            raise DownloadError(  # final: the server sent a whole file, and it is not the one expected
                f"download of {url} has {expected[0]} {got}, expected {expected[1]}: the file there is not the "
                "expected one, or is corrupt; check the URL"
            )
    return dest
