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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.unet import UNetConfig
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
    checkpoints: Path = Path("data/checkpoints")  # training checkpoints + the MLflow run id (persists)
    train: Path = Path("results/train")  # model.pt (EMA weights), train_metrics.csv, mlflow_run_id
    reference: Path = Path("data/reference")  # FID reference statistics, <data.name>.npz
    samples: Path = Path("results/samples")  # images/{index:06d}.png, grid.png, sample_stats.json
    metrics: Path = Path("results/metrics.json")  # FID and the sampling config, for `dvc metrics show`


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


class ModelConfig(Section):
    """The ``model`` section: the U-Net's shape (its image size and channels come from the data)."""

    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32

    def unet_config(self, image_size: int, in_channels: int = 3) -> UNetConfig:
        return UNetConfig(image_size=image_size, in_channels=in_channels, **self.model_dump())


class DiffusionConfig(Section):
    """The ``diffusion`` section: the forward process the model is trained for."""

    schedule: Literal["linear", "cosine"] = "linear"
    num_train_steps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)


class TrainConfig(Section):
    """The ``train`` section. ``batch_size`` is per process: the global batch is batch_size x processes."""

    steps: int = Field(2000, ge=1)  # optimizer steps in total
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup: int = Field(100, ge=0)  # steps of linear LR warm-up from 0
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    lambda_reg: float = Field(0.1, ge=0)  # weight of the complexity term; 0 is the plain DDPM loss
    complexity_mode: Literal["design", "scaled"] = "scaled"
    random_flip: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 elsewhere
    compile: bool = False
    channels_last: bool = True
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # auto: cuda, then mps, then cpu
    num_workers: int = Field(2, ge=0)  # DataLoader worker processes per rank
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (bit-exact reruns; slower on GPU)
    log_every: int = Field(50, ge=1)  # metrics to CSV/MLflow, NaN check, progress bar
    sample_every: int = Field(500, ge=0)  # a 16-image EMA sample grid to MLflow (0: only at the end)
    sample_steps: int = Field(50, ge=1)  # DDIM steps for those grids
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the newest checkpoint
    nproc_per_node: int = Field(1, ge=1)  # > 1: `ddim train` launches torchrun with this many processes


class SampleConfig(Section):
    """The ``sample`` section: how images are generated from ``model.pt``."""

    num_samples: int = Field(1000, ge=1)
    batch_size: int = Field(100, ge=1)
    sampler: Literal["ddim", "adaptive"] = "ddim"
    steps: int = Field(50, ge=1)  # ddim: number of timesteps
    eta: float = Field(0.0, ge=0)  # 0: deterministic DDIM; 1: DDPM-like
    spacing: Literal["uniform", "quad", "trailing"] = "quad"
    clip_x0: bool = True
    seed: int = 0  # image i starts from the noise of seed + i, whatever the batch size
    # adaptive sampler: stride = clamp(base_step_size / complexity(x0_pred), min_step, max_step) timesteps
    base_step_size: float = Field(2.0, gt=0)
    min_step: int = Field(5, ge=1)
    max_step: int = Field(100, ge=1)
    complexity_mode: Literal["design", "scaled"] = "scaled"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 elsewhere
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"

    @model_validator(mode="after")
    def _steps_ordered(self) -> SampleConfig:
        if self.min_step > self.max_step:
            raise ValueError(f"sample.min_step ({self.min_step}) must not exceed sample.max_step ({self.max_step})")
        return self


class EvaluateConfig(Section):
    """The ``evaluate`` section: FID against the prepared dataset's Inception statistics."""

    reference_count: int | None = None  # images of the dataset in the reference statistics (null: all)
    batch_size: int = Field(200, ge=1)
    num_workers: int = Field(0, ge=0)  # PNG-decoding processes
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"


class TrackingConfig(Section):
    """The ``tracking`` section: MLflow. ``uri: null`` means ``sqlite:///<current dir>/mlflow.db``."""

    uri: str | None = None
    experiment: str = "ddim"


class Params(Section):
    """All of params.yaml. Sections a stage does not read are still validated."""

    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        try:
            self.model.unet_config(self.data.image_size)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        if self.diffusion.schedule == "linear" and self.diffusion.beta_start > self.diffusion.beta_end:
            raise ValueError("diffusion: beta_start must not exceed beta_end")
        if self.sample.steps > self.diffusion.num_train_steps:
            raise ValueError(
                f"sample.steps ({self.sample.steps}) exceeds diffusion.num_train_steps "
                f"({self.diffusion.num_train_steps})"
            )
        return self


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
