"""Typed, validated configuration for each stage: the one home of every param's default.

The classes below define every key of ``params.yaml``: its type, its allowed values, its default and its
meaning (the ``description``, which is also the comment beside the key in ``params.yaml``). The defaults are
DDPM's CIFAR-10 setup, evaluated as in DDIM's Table 1; the ``model`` section is made from
:class:`models.unet.UNetConfig`'s fields and defaults, and the closed choices (beta schedule, DDIM spacing,
complexity mode) are the ``Literal`` types of ``models/``. A profile (``profiles/NAME.yaml``) lists only what
differs from these defaults; ``ddim profile NAME`` writes the complete, commented ``params.yaml`` that DVC
reads (:func:`profile_params`, :func:`render_params`).

``--set data.count=500`` overrides one key with a YAML scalar, the same form as ``dvc exp run -S``.
Everything is validated before any work starts; a bad value is a :class:`ConfigError` whose message is one
line naming the key, the problem and what is allowed.

Keys made with :func:`runtime` change how a stage runs (where, how fast, how often it logs), never what it
produces: ``dvc.yaml`` does not list them, so changing one reruns nothing (:func:`result_keys`).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from models.diffusion import BetaSchedule, ComplexityMode, Spacing, alphas_cumprod_from_betas, make_beta_schedule
from models.unet import UNetConfig
from tasks.devices import Device, Precision
from tasks.errors import UserError

if typing.TYPE_CHECKING:
    import torch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class ConfigError(UserError):
    """params.yaml, a profile or an override is invalid."""


def runtime(default: Any, description: str, **constraints: Any) -> Any:
    """A key that changes how a stage runs, never what it produces (not a DVC param of any stage)."""
    return Field(default, description=description, json_schema_extra={"runtime": True}, **constraints)


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are immutable once loaded, and no number is NaN or
    infinite (``.inf`` in YAML would pass every ``ge`` bound)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def result_keys(cls) -> list[str]:
        """The keys whose value can change what a stage produces (all but the :func:`runtime` ones)."""
        return [name for name, f in cls.model_fields.items() if not (f.json_schema_extra or {}).get("runtime")]


class PathsConfig(Section):
    """Where stages read and write. Relative paths are relative to the current directory."""

    raw: Path = Field(Path("data/raw"), description="downloads (the CIFAR-10 archive)")
    prepared: Path = Field(Path("data/prepared"), description="prepared datasets, one folder per data.name")
    checkpoints: Path = Field(Path("data/checkpoints"), description="training checkpoints (kept between runs)")
    train: Path = Field(Path("results/train"), description="model.pt, train_run.json, train_metrics.csv")
    reference: Path = Field(Path("data/reference"), description="FID reference statistics, <data.name>.npz")
    samples: Path = Field(Path("results/samples"), description="images/, grid.png, sample_stats.json")
    metrics: Path = Field(Path("results/metrics.json"), description="the FID and how it was made (DVC metrics)")
    sweep: Path = Field(Path("results/sweep"), description="the sweep: cells/, table.csv, table.md, fid_vs_nfe.png")
    latent: Path = Field(Path("results/latent"), description="reconstruct.{csv,md,json,png}, interpolation.png")


class DataConfig(Section):
    """The ``data`` section: what the prepare stage builds."""

    name: str = Field("cifar10", description="output folder: <paths.prepared>/<name>")
    source: Literal["cifar10", "folder", "shapes"] = Field("cifar10", description="cifar10 | folder | shapes")
    split: Literal["train", "test"] = Field("train", description="cifar10: train (50,000) | test (10,000)")
    image_size: int = Field(32, description="pixels, a positive multiple of 8")
    count: int | None = Field(None, description="shapes: how many; cifar10/folder: the first N (null: all)")
    seed: int = Field(0, description="shapes only")
    path: Path | None = Field(None, description="folder: a directory (searched recursively) or .zip of images")
    on_bad_image: Literal["skip", "fail"] = Field("fail", description="folder: fail | skip (warn, count) unreadable")
    max_file_bytes: int = Field(
        64 * 2**20, ge=1, description="folder: a bigger file or zip member is a bad image (bounds memory)"
    )
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="folder: an image of more pixels is a bad image (decompression bombs)"
    )
    archive: Path | None = runtime(None, "cifar10: a downloaded cifar-10-python.tar.gz (MD5-checked; no download)")
    url: str = runtime(CIFAR10_URL, "cifar10: where to download from when no archive is given")
    workers: int = runtime(0, "folder: decoding processes (0: in this process)", ge=0)

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

    @model_validator(mode="after")
    def _source_needs(self) -> DataConfig:
        if self.source == "shapes" and self.count is None:
            raise ValueError("data.count: the shapes source needs a number of images to generate")
        if self.source == "folder" and self.path is None:
            raise ValueError("data.path: the folder source needs a directory or .zip of images")
        return self


# The fields of UNetConfig that the data decides; the rest make up the ``model`` section.
_FROM_DATA = ("image_size", "in_channels", "out_channels")


class _ModelSection(Section):
    pretrained: str | None = Field(
        None, description="import these weights instead of training: hub id, https URL, diffusers folder or file"
    )

    def unet_config(self, image_size: int, in_channels: int = 3) -> UNetConfig:
        shape = self.model_dump(exclude={"pretrained"})
        return UNetConfig(image_size=image_size, in_channels=in_channels, **shape)


def _model_section() -> type[_ModelSection]:
    """The ``model`` section: UNetConfig's fields (their types, defaults and help), less those of the data."""
    types = typing.get_type_hints(UNetConfig)
    fields = {
        f.name: (types[f.name], Field(f.default, description=f.metadata["help"]))
        for f in dataclasses.fields(UNetConfig)
        if f.name not in _FROM_DATA
    }
    doc = "The ``model`` section: the U-Net's shape (its image size and channels come from the data)."
    return create_model("ModelConfig", __base__=_ModelSection, __doc__=doc, **fields)


ModelConfig = _model_section()


class DiffusionConfig(Section):
    """The ``diffusion`` section: the forward process the model is trained for."""

    schedule: BetaSchedule = Field("linear", description="linear (DDPM) | cosine")
    num_train_steps: int = Field(1000, ge=2, description="T, the number of noise levels")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="linear: beta_1")
    beta_end: float = Field(0.02, gt=0, lt=1, description="linear: beta_T")

    def alphas_cumprod(self) -> torch.Tensor:
        """The paper's alpha_t for t = 0..T-1, float64 on the CPU."""
        betas = make_beta_schedule(self.schedule, self.num_train_steps, self.beta_start, self.beta_end)
        return alphas_cumprod_from_betas(betas)


class TrainConfig(Section):
    """The ``train`` section. ``batch_size`` is per process: the global batch is batch_size x processes."""

    steps: int = Field(800_000, ge=1, description="optimizer steps in total (more steps resume a finished run)")
    batch_size: int = Field(128, ge=1, description="per process; the global batch is batch_size x processes")
    lr: float = Field(2e-4, gt=0, description="Adam's learning rate")
    warmup: int = Field(5000, ge=0, description="steps of linear LR warm-up from 0")
    grad_clip: float = Field(1.0, gt=0, description="maximum gradient norm")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="decay of the EMA weights that model.pt holds")
    lambda_reg: float = Field(0.1, ge=0, description="the complexity term's weight; 0 is the plain DDPM loss")
    complexity_mode: ComplexityMode = Field("scaled", description="scaled | design (the document's near-zero term)")
    random_flip: bool = Field(True, description="flip each training image left-right with probability 1/2")
    precision: Precision = Field("auto", description="auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp16 | fp32")
    compile: bool = Field(False, description="torch.compile the training step")
    channels_last: bool = Field(True, description="NHWC activations (faster convolutions on most devices)")
    seed: int = Field(0, description="initial weights, data order and every step's noise")
    deterministic: bool = Field(False, description="deterministic kernels: bit-exact reruns, slower on GPU")
    nproc_per_node: int = Field(1, ge=1, description="> 1: `ddim train` runs torchrun with this many processes")
    nnodes: int = Field(1, ge=1, description="> 1: machines, each running `ddim train`, meeting at rdzv_endpoint")
    rdzv_endpoint: str = runtime("", "nnodes > 1: host:port of the rendezvous (one of the nodes), reachable from all")
    rdzv_id: str = runtime("ddim", "nnodes > 1: the job's id, the same on every node")
    max_restarts: int = runtime(0, "torchrun restarts of failed ranks; each restart resumes from a checkpoint", ge=0)
    device: Device = runtime("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    num_workers: int = runtime(4, "DataLoader worker processes per training process", ge=0)
    log_every: int = runtime(100, "steps between metric rows (CSV, MLflow) and NaN checks", ge=1)
    sample_every: int = runtime(10_000, "steps between EMA sample grids in MLflow (0: only at the end)", ge=0)
    sample_steps: int = runtime(50, "DDIM steps for those grids", ge=1)
    checkpoint_every: int = runtime(5000, "steps between checkpoints", ge=1)
    keep_checkpoints: int = runtime(3, "newest checkpoints kept", ge=1)
    resume: Literal["auto", "never"] = runtime("auto", "auto: continue from the newest checkpoint | never")

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.nnodes > 1 needs train.rdzv_endpoint: host:port of one node, reachable from all")
        if self.resume == "never" and self.max_restarts > 0:
            raise ValueError(
                "train.resume=never with train.max_restarts > 0: a restarted rank would refuse the checkpoints its "
                "own job wrote; use train.resume=auto"
            )
        return self


class SampleConfig(Section):
    """The ``sample`` section: how images are generated from ``model.pt``."""

    num_samples: int = Field(50_000, ge=1, description="images to generate (FID below 2,048 is biased)")
    batch_size: int = Field(500, ge=1, description="images per sampler call")
    sampler: Literal["ddim", "adaptive"] = Field("ddim", description="ddim | adaptive (the design's sampler)")
    steps: int = Field(100, ge=1, description="ddim: number of timesteps")
    eta: float = Field(0.0, ge=0, description="0: deterministic DDIM; 1: DDPM-like")
    spacing: Spacing = Field("quad", description="ddim: uniform | quad (DDIM's CIFAR-10 table) | linspace | trailing")
    clip_x0: bool = Field(True, description="clamp each x0 prediction to [-1, 1]")
    seed: int = Field(0, description="image i's noise comes from (seed, i), whatever the batch size")
    base_step_size: float = Field(2.0, gt=0, description="adaptive: stride = clamp(base / complexity(x0), min, max)")
    min_step: int = Field(5, ge=1, description="adaptive: smallest stride, in training timesteps")
    max_step: int = Field(100, ge=1, description="adaptive: largest stride")
    complexity_mode: ComplexityMode = Field("scaled", description="adaptive: scaled | design")
    precision: Precision = Field("auto", description="auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp16 | fp32")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the network: auto (on CUDA GPUs, 2.6x faster on an H100) | true | false"
    )
    device: Device = runtime("auto", "auto | cuda | mps | cpu")
    nproc_per_node: int = runtime(1, "> 1: `ddim sample` runs torchrun with this many processes (one per GPU)", ge=1)

    @model_validator(mode="after")
    def _steps_ordered(self) -> SampleConfig:
        if self.min_step > self.max_step:
            raise ValueError(f"sample.min_step ({self.min_step}) must not exceed sample.max_step ({self.max_step})")
        return self


class SweepConfig(Section):
    """The ``sweep`` section: DDIM over steps x eta from model.pt, one FID per cell (``ddim sweep``; not part of
    ``make demo``). Seed, clip_x0, precision and device are the sample section's."""

    steps: list[int] = Field([10, 20, 50, 100], min_length=1, description="DDIM steps, one cell per value and eta")
    # int | float keeps the literal as written (0 stays 0, 0.0 stays 0.0): DVC names a cell's output by the value
    # as YAML wrote it (`eta0` for `0`), and so must the cell (tasks.sweep.cell_name).
    eta: list[int | float] = Field([0.0, 0.2, 0.5, 1.0], min_length=1, description="eta, one cell per value and steps")
    spacing: Spacing = Field("quad", description="uniform | quad (DDIM's CIFAR-10 table) | linspace | trailing")
    num_samples: int = Field(50_000, ge=2, description="images per cell, all of them scored (no floor division)")
    batch_size: int = runtime(500, "images per sampler call (DDIM's images do not depend on it)", ge=1)
    images: bool = runtime(False, "also keep each cell's images as PNGs in cells/<cell>/ (FID never needs them)")
    nproc_per_node: int = runtime(1, "> 1: each cell runs under torchrun with this many processes", ge=1)

    @field_validator("steps", "eta")
    @classmethod
    def _distinct_values(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        if any(x < 0 for x in v):
            raise ValueError(f"values must not be negative, got {v}")
        return v


class EvaluateConfig(Section):
    """The ``evaluate`` section: FID against the prepared dataset's Inception statistics."""

    reference_count: int | None = Field(None, ge=2, description="dataset images in the FID reference (null: all)")
    batch_size: int = runtime(200, "images per Inception call", ge=1)
    num_workers: int = runtime(4, "image-decoding processes", ge=0)
    device: Device = runtime("auto", "auto | cuda | mps | cpu")


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class LatentConfig(Section):
    """The ``latent`` section: DDIM's latent space (``ddim reconstruct``, ``ddim interpolate``; not part of ``make
    demo``). Precision, device and compile are the sample section's."""

    dataset: str | None = Field(None, description="reconstruct: a prepared dataset's name (null: data.name)")
    num_images: int = Field(64, ge=1, description="reconstruct: the dataset's first N images")
    steps: list[int] = Field([10, 20, 50, 100], min_length=1, description="reconstruct: DDIM steps S, one row each")
    spacing: Spacing = Field("uniform", description="uniform | quad | linspace | trailing (encoding and decoding)")
    clip_x0: bool = Field(False, description="clamp x0 predictions while decoding (false: the exact inverse ODE)")
    pairs: int = Field(4, ge=1, description="interpolate: pairs of latents, one row each for slerp and lerp")
    frames: int = Field(9, ge=2, description="interpolate: images per row, both ends included")
    interpolate_steps: int = Field(50, ge=1, description="interpolate: DDIM steps to encode and decode")
    endpoints: Literal["seeds", "images"] = Field(
        "seeds", description="interpolate: Gaussian latents from (seed, i) | the dataset's first images, encoded"
    )
    seed: int = Field(0, description="interpolate, endpoints seeds: pair k joins seeds (seed, 2k) and (seed, 2k + 1)")
    batch_size: int = runtime(64, "images per encoder/decoder call (results do not depend on it)", ge=1)

    @field_validator("dataset")
    @classmethod
    def _dataset_is_a_folder_name(cls, v: str | None) -> str | None:
        return None if v is None else DataConfig._name_is_a_folder_name(v)


class TrackingConfig(Section):
    """The ``tracking`` section: MLflow."""

    uri: str | None = runtime(None, "MLflow tracking URI (null: sqlite:///<current dir>/mlflow.db)")
    experiment: str = runtime("ddim", "MLflow experiment name")
    flush_timeout: float = runtime(
        30.0, "seconds a stage waits at its end for a tracking server that stopped answering", ge=0, le=86_400
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str | None) -> str | None:
        scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if uri and ":" in uri else ""
        if uri and scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"{uri!r} is not an MLflow tracking URI: use one of {', '.join(TRACKING_SCHEMES)}:// or a path"
            )
        return uri


class Params(Section):
    """All of params.yaml. Sections a stage does not read are still validated."""

    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()  # type: ignore[valid-type]
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    sweep: SweepConfig = SweepConfig()
    latent: LatentConfig = LatentConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        try:
            self.model.unet_config(self.data.image_size)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        if self.diffusion.schedule == "linear" and self.diffusion.beta_start > self.diffusion.beta_end:
            raise ValueError("diffusion: beta_start must not exceed beta_end")
        T = self.diffusion.num_train_steps
        steps = [("sample.steps", [self.sample.steps]), ("sweep.steps", self.sweep.steps)]
        steps += [("latent.steps", self.latent.steps), ("latent.interpolate_steps", [self.latent.interpolate_steps])]
        for key, values in steps:
            if bad := [v for v in values if not 1 <= v <= T]:
                raise ValueError(f"{key} {bad} outside 1..diffusion.num_train_steps ({T})")
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading params.yaml and --set overrides
# ---------------------------------------------------------------------------------------------------------


MAX_PARAMS_BYTES = 1 << 20  # a params file is a few kB; this one is 9


class _ParamsLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases: a params file never needs them, and nested ones (a "billion laughs"
    file of a few hundred bytes) expand to gigabytes when validated and quoted in the error."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed: write the value out", mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ParamsLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.count=500"`` -> ``(["data", "count"], 500)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set data.count=500")
    try:
        value = safe_yaml(raw) if raw else None
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


def _describe(error: ValidationError, most: int = 8) -> str:
    parts = []
    errors = error.errors()
    for e in errors[:most]:
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        elif "input" in e and e["type"] not in ("missing", "value_error"):
            shown = repr(e["input"])
            msg = f"{msg}, got {shown if len(shown) <= 80 else shown[:77] + '...'}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > most:
        parts.append(f"and {len(errors) - most} more")
    return "; ".join(parts)


def validate_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid {source}: {_describe(e)}") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path} is {size:,} bytes, over {MAX_PARAMS_BYTES:,}: a params file is a few kB")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``path``, apply ``overrides`` (``key.path=value``), validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found: run from the project root or pass --params FILE")
    return validate_params(apply_overrides(read_yaml_mapping(path), overrides or []))


# ---------------------------------------------------------------------------------------------------------
# Profiles: overlays on the defaults, rendered into a complete params.yaml
# ---------------------------------------------------------------------------------------------------------


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` on top, section by section (lists and values are replaced, not merged)."""
    out = dict(base)
    for key, value in overlay.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both_sections else value
    return out


def profile_names(profiles: Path) -> list[str]:
    return sorted(p.stem for p in Path(profiles).glob("*.yaml"))


def profile_params(name: str, profiles: str | Path = "profiles") -> Params:
    """The defaults with ``profiles/<name>.yaml`` on top, validated."""
    path = Path(profiles) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(profile_names(Path(profiles))) or "none"
        raise ConfigError(f"no profile {name!r} in {profiles}/: choose one of {known}")
    defaults = Params().model_dump(mode="json")
    return validate_params(merge(defaults, read_yaml_mapping(path)), source=f"profile {name}")


def _yaml_value(value: Any) -> str:
    """One value in YAML flow style: ``null``, ``0.0002``, ``[1, 2, 2]``, ``'0 3 * * *'``."""
    return yaml.safe_dump([value], default_flow_style=True, width=1_000).strip()[1:-1]


def render_params(params: Params, header: str) -> str:
    """A complete params.yaml for ``params``: every section and key, each with its description as a comment."""
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    values = params.model_dump(mode="json")
    for section, info in Params.model_fields.items():
        lines += ["", f"{section}:"]
        for key, field in info.annotation.model_fields.items():
            text = f"  {key}: {_yaml_value(values[section][key])}"
            lines.append(f"{text:<30} # {field.description}" if field.description else text)
    return "\n".join(lines) + "\n"
