"""Prefect flows: one per pipeline stage. Each flow only orchestrates; the work is in ``tasks/``.

A flow takes the params file and ``--set`` style overrides as its parameters, so a deployment or a UI run
can change any param the way the CLI does. Tasks that write files opt out of Prefect's result cache
(``NO_CACHE``): DVC decides what is up to date.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import CIFAR10_URL, DataConfig, load_params
from tasks.data import CIFAR10_MD5, cifar10_archive_path, download, prepare_dataset


@task(name="download-cifar10", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[10, 60, 300])
def download_task(url: str, dest: Path, md5: str = CIFAR10_MD5) -> Path:
    return download(url, dest, md5)


@task(name="prepare-dataset", cache_policy=NO_CACHE)
def prepare_task(data: DataConfig, paths: Any, archive: Path | None) -> dict[str, Any]:
    return prepare_dataset(data, paths, archive=archive)


def manifest_markdown(manifest: dict[str, Any], where: Path) -> str:
    rows = [
        ("dataset", f"`{where}`"),
        ("source", manifest["source"] + (f" ({manifest['split']})" if manifest.get("split") else "")),
        ("images", f"{manifest['count']:,} x {manifest['height']}x{manifest['width']}x{manifest['channels']}"),
        ("skipped", str(manifest["skipped"])),
        ("sha256", f"`{manifest['sha256']}`"),
        ("preview", f"`{where / 'preview.png'}`"),
    ]
    return "\n".join(["# Prepared dataset", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


@flow(name="prepare", description="Download, import or synthesize the dataset into data/prepared/<name>.")
def prepare_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    params = load_params(params_file, overrides)
    data, paths = params.data, params.paths
    archive = None
    if data.source == "cifar10" and data.archive is None:
        archive = download_task(data.url or CIFAR10_URL, cifar10_archive_path(paths))
    manifest = prepare_task(data, paths, archive)
    where = Path(paths.prepared) / data.name
    create_markdown_artifact(
        key="dataset-manifest", markdown=manifest_markdown(manifest, where), description=f"prepare {data.name}"
    )
    return manifest
