"""Small file helpers shared by the stages: atomic writes, JSON, hashes, torch files, what a stage wrote.

Every file the pipeline writes goes through :func:`atomic_path`: it is written under a temporary name beside
its final path and renamed into place only when complete, so a reader (or a rerun after a crash) sees either
the old file or the whole new one, never a truncated one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tasks.common.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def project_path(path: str | Path) -> Path:
    """``path``, a relative one taken from the DVC project's root: what outlives a run (checkpoints, the MLflow
    store) must not land in the temporary copy of the project in which DVC runs a queued experiment
    (``dvc exp run --queue``; it is deleted afterwards). DVC tells every stage command the project's root in
    ``DVC_ROOT`` (a queued experiment's too); without it (a stage run by hand), the current directory."""
    path, root = Path(path), os.environ.get("DVC_ROOT")
    if path.is_absolute() or not root or Path(root).resolve() == Path.cwd().resolve():
        return path
    return Path(root) / path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the final file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success put it in place of ``path`` (a folder the caller
    has checked it may replace, or nothing), on error delete it. ``path`` is the old folder or the whole new one,
    but for the moment between two renames (a folder cannot replace another in one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
    old = staging.with_name(f"{staging.name}.old")
    try:
        yield staging
        if path.exists():
            path.rename(old)
        staging.rename(path)
    except BaseException:
        if old.exists() and not path.exists():
            old.rename(path)  # the old folder back where it was
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json(obj: Any, path: str | Path) -> None:
    """``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def markdown_table(rows: list[dict[str, Any]], columns: list[str], float_format: str = ".2f") -> str:
    """``rows`` as a Markdown table of ``columns`` (a missing or None value is an empty cell)."""

    def show(value: Any) -> str:
        return "" if value is None else format(value, float_format) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` atomically, with the same bytes for the same ``obj``.

    Saving through a file object (not a file name) keeps the temporary file's name out of the archive:
    ``torch.save(obj, "x.pt")`` names its records after the file, so the bytes would depend on it.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def foreign_entries(
    folder: Path, own: re.Pattern[str], subfolders: Mapping[str, re.Pattern[str]] | None = None
) -> list[str]:
    """The entries of ``folder`` that a stage did not write: each that is not a plain file whose name ``own``
    matches, and inside each plain folder named in ``subfolders``, each that its pattern does not match. Empty
    for a folder the stage made itself: what a stage may delete or replace is decided here."""

    def is_own(entry: Path, pattern: re.Pattern[str]) -> bool:
        return bool(pattern.fullmatch(entry.name)) and entry.is_file() and not entry.is_symlink()

    foreign = []
    for entry in sorted(folder.iterdir()):
        inner = (subfolders or {}).get(entry.name)
        if inner is not None and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir()) if not is_own(e, inner)]
        elif not is_own(entry, own):
            foreign.append(entry.name)
    return foreign


class OutputBusyError(UserError):
    """Another process is writing the same output."""


def lock_path(output: str | Path) -> Path:
    """The lock file of ``output``: hidden beside it (never inside, where DVC would count it as output)."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


@contextmanager
def exclusive(output: str | Path, holder: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` for the block: a second process raises :class:`OutputBusyError` naming
    the first (``holder``, its PID and start time), or with ``wait`` waits for it. The lock is the kernel's
    (``flock``): it ends with the process, however that ends, so a killed run leaves no stale lock."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            who = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise OutputBusyError(f"{output} is being written by {who}: wait for it to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (PID {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
