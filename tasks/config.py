"""Typed, validated configuration for each stage, loaded from ``params.yaml`` plus ``--set`` overrides.

``params.yaml`` is the single source of truth: one section per stage (``data``, ``model``, ...) and a
``paths`` section. ``--set data.count=500`` overrides one key with a YAML scalar, the same form as
``dvc exp run -S``. Everything is validated before any work starts; a bad value is a :class:`ConfigError`
whose message is one line naming the key, the problem and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from tasks.errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class ConfigError(UserError):
    """params.yaml or an override is invalid."""


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    """Where stages read and write. Relative paths are relative to the current directory."""

    raw: Path = Path("data/raw")  # downloads (the CIFAR-10 archive)
    prepared: Path = Path("data/prepared")  # one folder per prepared dataset, named by data.name


class DataConfig(Section):
    """The ``data`` section: what the prepare stage builds."""

    name: str = "shapes32"  # folder under paths.prepared
    source: Literal["cifar10", "folder", "shapes"] = "shapes"
    split: Literal["train", "test"] = "train"  # cifar10 only
    image_size: int = 32
    count: int | None = 2000  # shapes: how many to generate; cifar10/folder: keep the first N (null: all)
    seed: int = 0  # shapes only
    path: Path | None = None  # folder: a directory (searched recursively) or a .zip of images
    archive: Path | None = None  # cifar10: an already-downloaded cifar-10-python.tar.gz (no download)
    url: str = CIFAR10_URL  # cifar10: where to download from when no archive is given
    on_bad_image: Literal["skip", "fail"] = "fail"  # folder: what an unreadable image does
    workers: int = 0  # folder: decoding processes (0: in this process)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"must be a plain folder name (letters, digits, . _ -), got {v!r}")
        return v

    @field_validator("image_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v < 8 or v % 8:
            raise ValueError(f"must be a positive multiple of 8 (e.g. 32, 64, 256), got {v}")
        return v

    @field_validator("count")
    @classmethod
    def _positive_count(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive number of images or null, got {v}")
        return v

    @field_validator("workers")
    @classmethod
    def _non_negative_workers(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _source_needs(self) -> DataConfig:
        if self.source == "shapes" and self.count is None:
            raise ValueError("data.count: the shapes source needs a number of images to generate")
        if self.source == "folder" and self.path is None:
            raise ValueError("data.path: the folder source needs a directory or .zip of images")
        return self


class Params(Section):
    """All of params.yaml. Sections a stage does not read are still validated."""

    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.count=500"`` -> ``(["data", "count"], 500)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set data.count=500")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``key.path=value`` set (creating intermediate sections)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        elif "input" in e and e["type"] not in ("missing", "value_error"):
            msg = f"{msg}, got {e['input']!r}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_params(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid params: {_describe(e)}") from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``path``, apply ``overrides`` (``key.path=value``), validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found: run from the project root or pass --params FILE")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return validate_params(apply_overrides(raw, overrides or []))
