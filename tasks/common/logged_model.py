"""A trained model as an MLflow 3 logged model: a pyfunc that draws images exactly as ``ddim sample`` does.

A logged model's folder (what ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` read):

- ``MLmodel``: the pyfunc flavor, whose loader is this module (:func:`_load_pyfunc`), and the signature;
- ``data/ddim/model.pt`` (``model.pt``'s format: the EMA weights at the logged step) and
  ``data/ddim/sampling.json`` (the run's ``sample`` section: the default sampler settings);
- ``code/models/`` and ``code/tasks/``: the code that draws the images as it was when the model was logged, so
  the model loads with the code that made it, wherever torch and the few packages of ``requirements.txt`` are;
- ``requirements.txt``, ``python_env.yaml``: those packages at the versions that logged it.

``predict(DataFrame with columns seed and index, params={sampler settings})`` returns uint8 images ``[N, H, W,
3]``: row (seed, i) is image i of ``ddim sample --set sample.seed=seed`` with the same settings (its noise comes
from (seed, i); ``index`` defaults to 0). The settings are the sample section's keys (:data:`SETTINGS`), each
defaulting to the run's value. Nothing is unpickled: the loader reads ``model.pt`` with ``weights_only=True``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.common.config import DiffusionConfig, SampleConfig
from tasks.common.errors import UserError
from tasks.common.files import file_hash
from tasks.common.images import to_uint8

if TYPE_CHECKING:
    import pandas as pd

DATA = "ddim"  # the data folder's name inside the logged model's data/
LOGGED_MODEL_FILE = Path("data") / DATA / "model.pt"  # the weights, in model.pt's format
MODEL_TYPE = "ddim-eps-unet"
# The sample section's keys that predict takes as params (how images are drawn, not how many or where).
SETTINGS = (
    *("sampler", "steps", "eta", "spacing", "order", "variant", "clip_x0", "base_step_size", "min_step"),
    *("max_step", "complexity_mode", "precision", "batch_size", "device"),
)
# An input example would run the sampler at every log (MLflow validates it); the signature describes the input.
# Set once here: warnings.catch_warnings is not thread-safe, and models are saved by the tracker's thread.
warnings.filterwarnings("ignore", message=".*input example was not provided", module="mlflow")
REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "safetensors", "tqdm")  # what code/ imports


def signature(sampling: dict[str, Any], image_size: int) -> Any:
    """The pyfunc's signature: rows of (seed, index) in, ``[N, H, W, 3]`` uint8 images out, the sampler
    settings as params with the run's values as defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    kinds = {bool: "boolean", int: "long", float: "double", str: "string"}
    params = [ParamSpec(key, kinds[type(sampling[key])], sampling[key]) for key in SETTINGS]
    return ModelSignature(
        inputs=Schema([ColSpec("long", "seed"), ColSpec("long", "index", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        params=ParamSchema(params),
    )


def save(folder: Path, model_pt: Path, sampling: dict[str, Any], mlflow_model: Any = None) -> None:
    """Write the logged model of ``model_pt`` into ``folder`` (which must not exist or be empty); ``sampling`` is
    the sample section the defaults come from, ``mlflow_model`` the MLmodel to fill (MLflow's ids in it)."""
    import shutil

    import mlflow.pyfunc
    import torch

    import models
    import tasks

    image_size = torch.load(model_pt, map_location="cpu", weights_only=True, mmap=True)["model_config"]["image_size"]

    with tempfile.TemporaryDirectory() as staging:
        data = Path(staging) / DATA
        data.mkdir()
        shutil.copyfile(model_pt, data / "model.pt")
        (data / "sampling.json").write_text(json.dumps(sampling, indent=2) + "\n")
        mlflow.pyfunc.save_model(
            path=str(folder),
            loader_module=__name__,
            data_path=str(data),
            code_paths=[str(Path(models.__file__).parent), str(Path(tasks.__file__).parent)],
            signature=signature(sampling, image_size),
            pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
            mlflow_model=mlflow_model,
        )


class ModelUpload:
    """One MLflow 3 logged model of a ``model.pt`` file (:func:`save`: a pyfunc), linked to its run at its step,
    sent with ``tracker.send(what, upload)``. In parts, each done once, so that a retry after an outage (a training
    run's Outbox retries what got no answer) goes on where the last try stopped; ``model_id`` is set once MLflow
    has made the model. A ``temporary`` file is deleted once it is uploaded."""

    def __init__(self, run_id: str, model_pt: Path, step: int, sampling: dict, tags: dict, temporary: bool) -> None:
        self.run_id, self.model_pt, self.step = run_id, Path(model_pt), step
        self.sampling, self.tags = sampling, {**tags, "model_sha256": file_hash(model_pt), "step": str(step)}
        self.model_id: str | None = None
        self.artifact_location: str | None = None
        self.done: set[str] = set()
        self.temporary = temporary

    def __call__(self, client: Any) -> None:
        """Send, through ``client`` (an ``MlflowClient``), what is not sent yet."""
        from mlflow.entities import LoggedModelOutput

        if self.model_id is None:
            experiment_id = client.get_run(self.run_id).info.experiment_id
            model = self._logged_before(client, experiment_id) or client.create_logged_model(
                experiment_id, f"ema-step{self.step}", self.run_id, self.tags, model_type=MODEL_TYPE
            )
            self.model_id, self.artifact_location = model.model_id, model.artifact_location
            if model.status.name == "READY":  # a rerun after the last step exports the same model.pt: logged
                return
        if "run" not in self.done:
            outputs = client.get_run(self.run_id).outputs
            if not any(o.model_id == self.model_id for o in (outputs.model_outputs if outputs else [])):
                client.log_outputs(self.run_id, [LoggedModelOutput(self.model_id, self.step)])
            self.done.add("run")
        if "artifacts" not in self.done:
            self._upload(client)
            self.done.add("artifacts")
        client.finalize_logged_model(self.model_id, "READY")
        if self.temporary:
            self.model_pt.unlink(missing_ok=True)

    def _logged_before(self, client: Any, experiment_id: str) -> Any:
        """This run's logged model of the same file and step, if one was made before: complete (a train stage that
        reruns after its last step exports the same model.pt again), or not (an upload cut short, which this one
        finishes); else None."""
        tags = self.tags
        query = f"source_run_id = '{self.run_id}' AND tags.model_sha256 = '{tags['model_sha256']}'"
        found = client.search_logged_models([experiment_id], filter_string=f"{query} AND tags.step = '{tags['step']}'")
        return max(found, key=lambda m: (m.status.name == "READY", m.creation_timestamp), default=None)

    def _upload(self, client: Any) -> None:
        from mlflow.models import Model

        ids = {"model_uuid": self.model_id, "run_id": self.run_id, "model_id": self.model_id}
        with tempfile.TemporaryDirectory(prefix="ddim-model-") as tmp:
            folder = Path(tmp) / "model"
            save(folder, self.model_pt, self.sampling, Model(artifact_path=self.artifact_location, **ids))
            client.log_model_artifacts(self.model_id, str(folder))


def _load_pyfunc(data_path: str) -> Sampler:
    """MLflow's entry point for this flavor: the model in ``data_path`` (``data/ddim``), on the best device."""
    from tasks.common.checkpoint import load_model

    folder = Path(data_path)
    model, state = load_model(folder / "model.pt")
    defaults = json.loads((folder / "sampling.json").read_text())
    return Sampler(model, DiffusionConfig(**state["diffusion"]), defaults)


@dataclass
class Sampler:
    """What ``mlflow.pyfunc.load_model(...)`` wraps: ``model.pt``'s network, its schedule, the default settings."""

    model: Any  # models.unet.UNet, on the CPU until a predict call says where
    diffusion: DiffusionConfig
    defaults: dict[str, Any]

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Images ``[N, H, W, 3]`` uint8 for the rows (seed, index) of ``model_input``, in their order."""
        from pydantic import ValidationError

        from tasks.common.config import ConfigError, describe_error
        from tasks.common.devices import on_device, pick_device, set_precision
        from tasks.common.inference import batches, sample_images

        try:
            cfg = SampleConfig.model_validate({**self.defaults, **(params or {})})
        except ValidationError as e:
            raise ConfigError(f"invalid sampler settings: {describe_error(e)}") from None
        seeds = np.asarray(model_input["seed"], dtype=np.int64)
        index = model_input["index"].fillna(0) if "index" in model_input else np.zeros(len(seeds))  # optional
        indices = np.asarray(index, dtype=np.int64)
        if len(seeds) and (seeds.min() < 0 or indices.min() < 0):
            raise UserError("seed and index must not be negative")
        device = pick_device(cfg.device)
        model, amp_dtype = self.model.to(device), set_precision(cfg.precision, device)[0]
        alphas_cumprod = on_device(self.diffusion.alphas_cumprod(), device)
        size = model.config.image_size
        images = np.zeros((len(seeds), size, size, 3), dtype=np.uint8)
        for seed in np.unique(seeds):  # one sampling run per seed, its images drawn by index in batches
            rows = np.flatnonzero(seeds == seed)
            for chunk in batches(rows.tolist(), cfg.batch_size):
                seeded = cfg.model_copy(update={"seed": int(seed)})
                x0, _ = sample_images(model, alphas_cumprod, seeded, indices[chunk].tolist(), amp_dtype)
                images[chunk] = to_uint8(x0)
        return images
