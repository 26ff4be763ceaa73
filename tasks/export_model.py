"""``ddim export-model OUT``: ``model.pt`` as a diffusers pipeline folder, which
``diffusers.DDIMPipeline.from_pretrained(OUT)`` loads and runs, and ``ddim import-model OUT`` reads back.

OUT holds, as diffusers writes a pipeline:

- ``model_index.json``: a ``DDIMPipeline`` of a ``UNet2DModel`` and a ``DDIMScheduler``;
- ``unet/config.json`` and ``unet/diffusion_pytorch_model.safetensors``: the EMA weights in diffusers' layout
  (:func:`models.weights.export_state_dict`; diffusers' eps equals ours to float32 rounding);
- ``scheduler/scheduler_config.json``: the beta schedule and T the model was trained for, and the settings that
  make diffusers' DDIM loop ours: ``set_alpha_to_one`` (the last step lands on alpha = 1), ``timestep_spacing:
  leading`` with ``steps_offset: 0`` (our ``uniform`` spacing) and ``clip_sample`` as ``sample.clip_x0``
  (call the pipeline with ``use_clipped_model_output=True`` to re-derive eps from the clipped x0, as we do);
- ``ddim_export.json``: what was exported (the model file's sha256) and the files written, which is how a later
  export recognises OUT as its own. An OUT that holds anything else is refused, never written over.

The folder is built beside OUT and renamed into place: OUT is either the old export or the new one, never half.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from models.diffusion import make_beta_schedule
from models.weights import diffusers_config, export_state_dict
from tasks.common.checkpoint import load_model
from tasks.common.errors import UserError
from tasks.common.files import atomic_folder, exclusive, file_hash, foreign_entries

RECORD = "ddim_export.json"
DIFFUSERS_FORMAT = "0.30.0"  # the diffusers release whose folder layout this writes (any later one reads it)
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class ExportError(UserError):
    """The model cannot be exported there."""


def scheduler_config(diffusion: dict[str, Any], clip_x0: bool) -> dict[str, Any]:
    """A ``DDIMScheduler`` config for our ``diffusion`` params whose DDIM steps are ours (see the module doc)."""
    config: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_FORMAT,
        "num_train_timesteps": diffusion["num_train_steps"],
        "beta_start": diffusion["beta_start"],
        "beta_end": diffusion["beta_end"],
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": clip_x0,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    if diffusion["schedule"] != "linear":  # diffusers' own cosine differs in its last digits: the betas themselves
        betas = make_beta_schedule(diffusion["schedule"], diffusion["num_train_steps"])
        config.update(beta_schedule="squaredcos_cap_v2", trained_betas=betas.tolist())
    return config


OWN_FILES = re.compile(r"model_index\.json|ddim_export\.json")
OWN_SUBFOLDERS = {
    "unet": re.compile(r"config\.json|diffusion_pytorch_model\.safetensors"),
    "scheduler": re.compile(r"scheduler_config\.json"),
}


def check_out(out: Path) -> None:
    """Refuse an OUT that is a file, or a folder holding anything but an earlier export's own files."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: give a folder to export into (it is created)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = foreign_entries(out, OWN_FILES, OWN_SUBFOLDERS)
    if not foreign and not (out / RECORD).is_file():
        foreign = sorted(p.name for p in out.iterdir())  # diffusers' own files, but not written by this command
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(
            f"{out} holds files that ddim export-model did not write ({listed}): give a new or empty folder"
        )


def write_folder(folder: Path, model_path: Path, clip_x0: bool) -> dict[str, Any]:
    """The diffusers pipeline folder of ``model_path`` in ``folder`` (which exists and is empty)."""
    from safetensors.torch import save_file

    model, state = load_model(model_path)
    weights = export_state_dict(model.state_dict(), model.config, "diffusers")
    unet_config = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_FORMAT}
    files = {
        "model_index.json": {
            "_class_name": "DDIMPipeline",
            "_diffusers_version": DIFFUSERS_FORMAT,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        },
        "unet/config.json": {**unet_config, **diffusers_config(model.config)},
        "scheduler/scheduler_config.json": scheduler_config(state["diffusion"], clip_x0),
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    record = {
        "model": str(model_path),
        "model_sha256": file_hash(model_path),
        "step": state.get("step"),
        "files": sorted([*files, WEIGHTS]),
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def run(model_path: Path, out: Path, clip_x0: bool = True) -> dict[str, Any]:
    """Export ``model_path`` (a ``model.pt``) to the diffusers folder ``out``; return what was written."""
    with exclusive(out, "`ddim export-model`"):
        check_out(out)
        with atomic_folder(out) as staging:
            record = write_folder(staging, model_path, clip_x0)
    return {"out": str(out), **{k: record[k] for k in ("model", "model_sha256", "step")}}
