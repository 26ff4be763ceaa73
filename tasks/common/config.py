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

Every other key is made with :func:`result`, which names the DVC stages whose outputs it can change: that
declaration is the one home of each stage's ``params:`` list in ``dvc.yaml`` (:func:`stage_params`, checked by
``tests/test_layout.py``). Keys made with :func:`runtime` change how a stage runs (where, how fast, how often it
logs), never what it produces: no stage lists them, so changing one reruns nothing (:meth:`Section.result_keys`
lists the others). The ``paths`` keys are neither: ``dvc.yaml`` uses them in its deps and outs.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from models.diffusion import BetaSchedule, ComplexityMode, Spacing, alphas_cumprod_from_betas, make_beta_schedule
from models.unet import UNetConfig
from tasks.common.devices import Device, Precision
from tasks.common.errors import UserError

if typing.TYPE_CHECKING:
    import torch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class ConfigError(UserError):
    """params.yaml, a profile or an override is invalid."""


# The stages of dvc.yaml, in its order.
STAGES = (
    "prepare",
    "reference",
    "train",
    "sample",
    "evaluate",
    "sweep",
    "sweep-solver",
    "sweep-table",
    "reconstruct",
    "interpolate",
)
# The sweep's cells: DDIM's steps x eta, and the ODE solvers' solver x steps.
SWEEP_CELLS = ("sweep", "sweep-solver")
# The stages that run the diffusion process: training, and every stage that runs the trained network.
MODEL_STAGES = ("train", "sample", *SWEEP_CELLS, "reconstruct", "interpolate")
# The stages that run the trained network (with the sample section's precision and compile).
INFERENCE_STAGES = ("sample", *SWEEP_CELLS, "reconstruct", "interpolate")
Sampler = Literal["ddim", "dpm-solver++", "unipc", "adaptive"]
#: The settings that apply to each sampler (the others are blank in its records and tables).
SAMPLER_SETTINGS = {
    "ddim": ("steps", "spacing", "eta"),
    "dpm-solver++": ("steps", "spacing", "order"),
    "unipc": ("steps", "spacing", "order", "variant"),
    "adaptive": ("base_step_size", "eta"),
}
SETTING_KEYS = ("sampler", "steps", "spacing", "eta", "order", "variant", "base_step_size")
#: A sweep solver, ``dpm-solver++-order2`` or ``unipc-bh2-order3``: groups sampler, variant (UniPC's), order.
SOLVER_SPEC = r"(dpm-solver\+\+(?=-order)|unipc(?=-bh))(?:-(bh1|bh2))?-order([1-3])"
SOLVER_FORMS = "dpm-solver++-order<1-3> or unipc-<bh1|bh2>-order<1-3>"  # what SOLVER_SPEC accepts, in words


def result(default: Any, description: str, *, stages: str | tuple[str, ...], **constraints: Any) -> Any:
    """A key that can change what ``stages`` (DVC stage names) write: each of them lists it under ``params:``
    in dvc.yaml, so changing it reruns them (:func:`stage_params`)."""
    names = (stages,) if isinstance(stages, str) else tuple(stages)
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(f"stages must name stages of dvc.yaml ({', '.join(STAGES)}), got {stages!r}")
    return Field(default, description=description, json_schema_extra={"stages": names}, **constraints)


def runtime(default: Any, description: str, **constraints: Any) -> Any:
    """A key that changes how a stage runs, never what it produces (not a DVC param of any stage)."""
    return Field(default, description=description, json_schema_extra={"runtime": True}, **constraints)


def stages_of(field: FieldInfo) -> tuple[str, ...]:
    """The stages whose outputs a key can change, as its :func:`result` declares (none for the others)."""
    return (field.json_schema_extra or {}).get("stages", ())  # type: ignore[union-attr, return-value]


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are immutable once loaded, and no number is NaN or
    infinite (``.inf`` in YAML would pass every ``ge`` bound)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def result_keys(cls) -> list[str]:
        """The keys whose value can change what a stage produces (all but the :func:`runtime` ones; with
        ``paths``, every key made with :func:`result`)."""
        return [name for name, f in cls.model_fields.items() if not (f.json_schema_extra or {}).get("runtime")]


class PathsConfig(Section):
    """Where stages read and write. Relative paths are relative to the current directory, but for
    ``checkpoints``: the DVC project's root (:func:`tasks.common.files.project_path`), so that a queued DVC
    experiment keeps its checkpoints when DVC deletes its temporary copy of the project."""

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

    # The latent stages read the prepared dataset data.name when latent.dataset is null.
    name: str = result(
        "cifar10", "output folder: <paths.prepared>/<name>", stages=("prepare", "reconstruct", "interpolate")
    )
    # source, split and count tell sweep-table whether DDIM's Table 1 applies (CIFAR-10's whole training set).
    source: Literal["cifar10", "folder", "shapes"] = result(
        "cifar10", "cifar10 | folder | shapes", stages=("prepare", "sweep-table")
    )
    split: Literal["train", "test"] = result(
        "train", "cifar10: train (50,000) | test (10,000)", stages=("prepare", "sweep-table")
    )
    image_size: int = result(32, "pixels, a positive multiple of 8", stages=("prepare", "train"))
    count: int | None = result(
        None, "shapes: how many; cifar10/folder: the first N (null: all)", stages=("prepare", "sweep-table")
    )
    seed: int = result(0, "shapes only", stages="prepare")
    path: Path | None = result(None, "folder: a directory (searched recursively) or .zip of images", stages="prepare")
    on_bad_image: Literal["skip", "fail"] = result(
        "fail", "folder: fail | skip (warn, count) unreadable", stages="prepare"
    )
    max_file_bytes: int = result(
        64 * 2**20, "folder: a bigger file or zip member is a bad image (bounds memory)", stages="prepare", ge=1
    )
    max_image_pixels: int = result(
        89_478_485, "folder: an image of more pixels is a bad image (decompression bombs)", stages="prepare", ge=1
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
    pretrained: str | None = result(
        None, "import these weights instead of training: hub id, https URL, diffusers folder or file", stages="train"
    )

    def unet_config(self, image_size: int, in_channels: int = 3) -> UNetConfig:
        shape = self.model_dump(exclude={"pretrained"})
        return UNetConfig(image_size=image_size, in_channels=in_channels, **shape)


def _model_section() -> type[_ModelSection]:
    """The ``model`` section: UNetConfig's fields (their types, defaults and help), less those of the data."""
    types = typing.get_type_hints(UNetConfig)
    fields = {
        f.name: (types[f.name], result(f.default, f.metadata["help"], stages="train"))
        for f in dataclasses.fields(UNetConfig)
        if f.name not in _FROM_DATA
    }
    doc = "The ``model`` section: the U-Net's shape (its image size and channels come from the data)."
    return create_model("ModelConfig", __base__=_ModelSection, __doc__=doc, **fields)


ModelConfig = _model_section()


class DiffusionConfig(Section):
    """The ``diffusion`` section: the forward process the model is trained for."""

    schedule: BetaSchedule = result("linear", "linear (DDPM) | cosine", stages=MODEL_STAGES)
    num_train_steps: int = result(1000, "T, the number of noise levels", stages=MODEL_STAGES, ge=2)
    beta_start: float = result(1e-4, "linear: beta_1", stages=MODEL_STAGES, gt=0, lt=1)
    beta_end: float = result(0.02, "linear: beta_T", stages=MODEL_STAGES, gt=0, lt=1)

    def alphas_cumprod(self) -> torch.Tensor:
        """The paper's alpha_t for t = 0..T-1, float64 on the CPU."""
        betas = make_beta_schedule(self.schedule, self.num_train_steps, self.beta_start, self.beta_end)
        return alphas_cumprod_from_betas(betas)


class TrainConfig(Section):
    """The ``train`` section. ``batch_size`` is per process: the global batch is batch_size x processes."""

    steps: int = result(800_000, "optimizer steps in total (more steps resume a finished run)", stages="train", ge=1)
    batch_size: int = result(128, "per process; the global batch is batch_size x processes", stages="train", ge=1)
    lr: float = result(2e-4, "Adam's learning rate", stages="train", gt=0)
    warmup: int = result(5000, "steps of linear LR warm-up from 0", stages="train", ge=0)
    grad_clip: float = result(1.0, "maximum gradient norm", stages="train", gt=0)
    ema_decay: float = result(0.9999, "decay of the EMA weights that model.pt holds", stages="train", ge=0, lt=1)
    lambda_reg: float = result(0.1, "the complexity term's weight; 0 is the plain DDPM loss", stages="train", ge=0)
    complexity_mode: ComplexityMode = result(
        "scaled", "scaled | design (the document's near-zero term)", stages="train"
    )
    random_flip: bool = result(True, "flip each training image left-right with probability 1/2", stages="train")
    precision: Precision = result("auto", "auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp16 | fp32", stages="train")
    compile: bool = result(False, "torch.compile the training step", stages="train")
    channels_last: bool = result(True, "NHWC activations (faster convolutions on most devices)", stages="train")
    seed: int = result(0, "initial weights, data order and every step's noise", stages="train")
    deterministic: bool = result(False, "deterministic kernels: bit-exact reruns, slower on GPU", stages="train")
    nproc_per_node: int = result(1, "> 1: `ddim train` runs torchrun with this many processes", stages="train", ge=1)
    nnodes: int = result(1, "> 1: machines, each running `ddim train`, meeting at rdzv_endpoint", stages="train", ge=1)
    rdzv_endpoint: str = runtime("", "nnodes > 1: host:port of the rendezvous (one of the nodes), reachable from all")
    rdzv_id: str = runtime("ddim", "nnodes > 1: the job's id, the same on every node")
    max_restarts: int = runtime(0, "torchrun restarts of failed ranks; each restart resumes from a checkpoint", ge=0)
    device: Device = runtime("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    num_workers: int = runtime(4, "DataLoader worker processes per training process", ge=0)
    log_every: int = runtime(100, "steps between metric rows (CSV, MLflow) and NaN checks", ge=1)
    sample_every: int = runtime(10_000, "steps between EMA sample grids in MLflow (0: only at the end)", ge=0)
    sample_steps: int = runtime(50, "DDIM steps for those grids", ge=1)
    model_every: int = runtime(
        100_000, "steps between EMA models logged to MLflow as pyfunc models (0: only the final one)", ge=0
    )
    fid_every: int = runtime(
        0, "steps between FIDs of the EMA model while training (0: off; needs the reference statistics)", ge=0
    )
    fid_samples: int = runtime(10_000, "images per training-time FID, drawn as the sample section says", ge=2)
    checkpoint_every: int = runtime(5000, "steps between checkpoints", ge=1)
    keep_checkpoints: int = runtime(3, "newest checkpoints kept", ge=1)
    resume: Literal["auto", "never"] = runtime("auto", "auto: continue from the newest checkpoint | never")
    cuda_graphs: Literal["auto"] | bool = runtime(
        "auto", "the whole step captured once as a CUDA graph and replayed: auto (on CUDA) | true | false"
    )
    data_on_device: Literal["auto"] | bool = runtime(
        "auto", "prepared images kept in device memory, batches gathered there: auto (CUDA, if they fit) | true | false"
    )

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainConfig:
        check_rendezvous("train", self.nnodes, self.rdzv_endpoint)
        if self.resume == "never" and self.max_restarts > 0:
            raise ValueError(
                "train.resume=never with train.max_restarts > 0: a restarted rank would refuse the checkpoints its "
                "own job wrote; use train.resume=auto"
            )
        return self


def check_rendezvous(section: str, nnodes: int, endpoint: str) -> None:
    if nnodes > 1 and not endpoint:
        raise ValueError(
            f"{section}.nnodes > 1 needs {section}.rdzv_endpoint: host:port of one node, reachable from all"
        )


class SampleConfig(Section):
    """The ``sample`` section: how images are generated from ``model.pt``."""

    num_samples: int = result(50_000, "images to generate (FID below 2,048 is biased)", stages="sample", ge=1)
    batch_size: int = result(500, "images per sampler call", stages="sample", ge=1)
    sampler: Sampler = result(
        "ddim", "ddim | dpm-solver++ | unipc (ODE solvers) | adaptive (the design's sampler)", stages="sample"
    )
    steps: int = result(100, "ddim, dpm-solver++, unipc: number of timesteps", stages="sample", ge=1)
    eta: float = result(0.0, "ddim, adaptive: 0 deterministic (the ODE); 1 DDPM-like", stages="sample", ge=0)
    spacing: Spacing = result(
        "quad",
        "ddim, dpm-solver++, unipc: uniform | quad (DDIM's CIFAR-10 table) | linspace | trailing",
        stages="sample",
    )
    order: int = result(2, "dpm-solver++, unipc: the solver's order (1-3)", stages="sample", ge=1, le=3)
    variant: Literal["bh1", "bh2"] = result("bh2", "unipc: bh1 | bh2 (the B(h) of Zhao et al.)", stages="sample")
    clip_x0: bool = result(True, "clamp each x0 prediction to [-1, 1]", stages=("sample", *SWEEP_CELLS))
    seed: int = result(
        0, "image i's noise comes from (seed, i), whatever the batch size", stages=("sample", *SWEEP_CELLS)
    )
    base_step_size: float = result(
        2.0, "adaptive: stride = clamp(base / complexity(x0), min, max)", stages="sample", gt=0
    )
    min_step: int = result(5, "adaptive: smallest stride, in training timesteps", stages="sample", ge=1)
    max_step: int = result(100, "adaptive: largest stride", stages="sample", ge=1)
    complexity_mode: ComplexityMode = result("scaled", "adaptive: scaled | design", stages="sample")
    precision: Precision = result(
        "auto", "auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp16 | fp32", stages=INFERENCE_STAGES
    )
    compile: Literal["auto"] | bool = result(
        "auto",
        "torch.compile the network: auto (on CUDA GPUs, 2.6x faster on an H100) | true | false",
        stages=INFERENCE_STAGES,
    )
    device: Device = runtime("auto", "auto | cuda | mps | cpu")
    nproc_per_node: int = runtime(1, "> 1: `ddim sample` runs torchrun with this many processes (one per GPU)", ge=1)
    nnodes: int = runtime(1, "> 1: machines, each running `ddim sample`, meeting at rdzv_endpoint", ge=1)
    rdzv_endpoint: str = runtime("", "nnodes > 1: host:port of the rendezvous (one of the nodes), reachable from all")
    rdzv_id: str = runtime("ddim-sample", "nnodes > 1: the job's id, the same on every node")

    @model_validator(mode="after")
    def _steps_ordered(self) -> SampleConfig:
        check_rendezvous("sample", self.nnodes, self.rdzv_endpoint)
        if self.min_step > self.max_step:
            raise ValueError(f"sample.min_step ({self.min_step}) must not exceed sample.max_step ({self.max_step})")
        return self

    def settings(self) -> dict[str, Any]:
        """The sampler and its settings, the ones that do not apply to it None: what records and tables show."""
        used = {"sampler", *SAMPLER_SETTINGS[self.sampler]}
        return {k: getattr(self, k) if k in used else None for k in SETTING_KEYS}

    def own_settings(self) -> dict[str, Any]:
        """The sampler and the settings that apply to it (:meth:`settings` without the others)."""
        return {k: v for k, v in self.settings().items() if v is not None}


class SweepConfig(Section):
    """The ``sweep`` section: DDIM over steps x eta and the ODE solvers over solver x steps from model.pt, one
    FID per cell (``ddim sweep``; not part of ``make demo``). Seed, clip_x0, precision and device are the sample
    section's."""

    # A sweep cell's own steps, eta and solver are in its command (dvc.yaml's matrices), not its params, so a new
    # value in the grid adds cells and reruns no other.
    steps: list[int] = result(
        [10, 20, 50, 100], "steps, one cell per value and eta or solver", stages="sweep-table", min_length=1
    )
    # int | float keeps the literal as written (0 stays 0, 0.0 stays 0.0): DVC names a cell's output by the value
    # as YAML wrote it (`eta0` for `0`), and so must the cell (tasks.sweep.cell_name).
    eta: list[int | float] = result(
        [0.0, 0.2, 0.5, 1.0], "DDIM's eta, one cell per value and steps", stages="sweep-table", min_length=1
    )
    solvers: list[str] = result(
        ["dpm-solver++-order2", "unipc-bh2-order2"],
        "dpm-solver++-order<1-3> | unipc-<bh1|bh2>-order<1-3>, one cell per solver and steps",
        stages="sweep-table",
    )
    spacing: Spacing = result(
        "quad", "uniform | quad (DDIM's CIFAR-10 table) | linspace | trailing", stages=(*SWEEP_CELLS, "sweep-table")
    )
    num_samples: int = result(
        50_000, "images per cell, all of them scored (no floor division)", stages=(*SWEEP_CELLS, "sweep-table"), ge=2
    )
    batch_size: int = runtime(500, "images per sampler call (the images do not depend on it)", ge=1)
    images: bool = runtime(False, "also keep each cell's images as PNGs in cells/<cell>/ (FID never needs them)")
    nproc_per_node: int = runtime(1, "> 1: each cell runs under torchrun with this many processes", ge=1)
    nnodes: int = runtime(1, "> 1: machines, each running the same cell, meeting at rdzv_endpoint", ge=1)
    rdzv_endpoint: str = runtime("", "nnodes > 1: host:port of the rendezvous (one of the nodes), reachable from all")
    rdzv_id: str = runtime("ddim-sweep", "nnodes > 1: the job's id, the same on every node")

    @model_validator(mode="after")
    def _rendezvous(self) -> SweepConfig:
        check_rendezvous("sweep", self.nnodes, self.rdzv_endpoint)
        return self

    @field_validator("steps", "eta")
    @classmethod
    def _distinct_values(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        if any(x < 0 for x in v):
            raise ValueError(f"values must not be negative, got {v}")
        return v

    @field_validator("solvers")
    @classmethod
    def _known_solvers(cls, v: list[str]) -> list[str]:
        if bad := [s for s in v if not re.fullmatch(SOLVER_SPEC, s)]:
            raise ValueError(f"write {SOLVER_FORMS}, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        return v


class EvaluateConfig(Section):
    """The ``evaluate`` section: FID against the prepared dataset's Inception statistics."""

    # The evaluate stage reads no params: how the images and the reference were made is recorded beside them.
    reference_count: int | None = result(
        None, "dataset images in the FID reference (null: all)", stages="reference", ge=2
    )
    batch_size: int = runtime(200, "images per Inception call", ge=1)
    num_workers: int = runtime(4, "image-decoding processes", ge=0)
    device: Device = runtime("auto", "auto | cuda | mps | cpu")


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class LatentConfig(Section):
    """The ``latent`` section: DDIM's latent space (``ddim reconstruct``, ``ddim interpolate``; not part of ``make
    demo``). Precision, device and compile are the sample section's."""

    dataset: str | None = result(
        None, "reconstruct: a prepared dataset's name (null: data.name)", stages=("reconstruct", "interpolate")
    )
    num_images: int = result(64, "reconstruct: the dataset's first N images", stages="reconstruct", ge=1)
    steps: list[int] = result(
        [10, 20, 50, 100], "reconstruct: DDIM steps S, one row each", stages="reconstruct", min_length=1
    )
    spacing: Spacing = result(
        "uniform", "uniform | quad | linspace | trailing (encoding and decoding)", stages=("reconstruct", "interpolate")
    )
    clip_x0: bool = result(
        False,
        "clamp x0 predictions while decoding (false: the exact inverse ODE)",
        stages=("reconstruct", "interpolate"),
    )
    pairs: int = result(4, "interpolate: pairs of latents, one row each for slerp and lerp", stages="interpolate", ge=1)
    frames: int = result(9, "interpolate: images per row, both ends included", stages="interpolate", ge=2)
    interpolate_steps: int = result(50, "interpolate: DDIM steps to encode and decode", stages="interpolate", ge=1)
    endpoints: Literal["seeds", "images"] = result(
        "seeds",
        "interpolate: Gaussian latents from (seed, i) | the dataset's first images, encoded",
        stages="interpolate",
    )
    seed: int = result(
        0, "interpolate, endpoints seeds: pair k joins seeds (seed, 2k) and (seed, 2k + 1)", stages="interpolate"
    )
    batch_size: int = runtime(64, "images per encoder/decoder call (results do not depend on it)", ge=1)

    @field_validator("dataset")
    @classmethod
    def _dataset_is_a_folder_name(cls, v: str | None) -> str | None:
        return None if v is None else DataConfig._name_is_a_folder_name(v)


class TrackingConfig(Section):
    """The ``tracking`` section: MLflow."""

    uri: str | None = runtime(None, "MLflow tracking URI (null: sqlite:///<project dir>/mlflow.db)")
    experiment: str = runtime("ddim", "MLflow experiment name")
    enabled: bool = runtime(True, "false: no MLflow at all (not imported, nothing logged): where it is not installed")
    flush_timeout: float = runtime(
        30.0, "seconds a stage waits at its end for a tracking server that stopped answering", ge=0, le=86_400
    )
    registered_model: str | None = runtime(None, "`ddim register`'s MLflow registered model (null: ddim-<data.name>)")
    system_metrics: float = runtime(
        10.0, "seconds between CPU/GPU utilisation and memory samples in a training or sampling run (0: off)", ge=0
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


def describe_error(error: ValidationError, most: int = 8) -> str:
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


def stage_params(stage: str) -> list[str]:
    """The ``section.key`` params that can change what DVC stage ``stage`` writes (each key whose :func:`result`
    names it), in params.yaml's order: the stage's ``params:`` list in dvc.yaml."""
    if stage not in STAGES:
        raise ValueError(f"no stage {stage!r} in dvc.yaml: one of {', '.join(STAGES)}")
    return [
        f"{section}.{key}"
        for section, info in Params.model_fields.items()
        for key, field in info.annotation.model_fields.items()
        if stage in stages_of(field)
    ]


def validate_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid {source}: {describe_error(e)}") from None


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
