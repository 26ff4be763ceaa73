"""The files that hold weights: ``model.pt`` (what sampling loads) and the training checkpoints.

``model.pt`` is a documented format: a dict, loadable with ``torch.load(path, weights_only=True)``, with

- ``model_config``: ``UNetConfig.to_dict()``, and ``ema``: the U-Net's state dict (the EMA weights). These
  two keys are the contract that other tools may rely on;
- ``diffusion``: the ``diffusion`` params the model was trained for; ``step``: optimizer steps taken;
  ``dataset_sha256``: the prepared dataset's checksum (both None for an imported model); ``source``: what
  made the file (``{"kind": "train"}``, or ``{"kind": "import", "from": ..., "file": ..., "sha256": ...}``);
  ``format_version``.

It holds only what defines the model, and it is written byte for byte the same for the same model, so its
hash (and DVC's view of it) changes only when the model does. Run metadata (params, MLflow run id, device,
precision) lives beside it in ``train_run.json``.

Checkpoints ``ckpt-<step>.pt`` hold everything a run needs to continue exactly: weights, EMA, optimizer and
grad-scaler state, the step (which is the whole random state; see ``tasks/train.py``) and a fingerprint of
what the run was made with.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from models.unet import UNet, UNetConfig
from tasks.errors import UserError
from tasks.files import save_torch

MODEL_FILE = "model.pt"
MODEL_FORMAT_VERSION = 1
CKPT_PATTERN = re.compile(r"ckpt-(\d{8})\.pt")


class ModelFileError(UserError):
    """model.pt is missing, unreadable or not a model of this pipeline."""


def save_model(path: Path, config: UNetConfig, ema: dict[str, torch.Tensor], **about: Any) -> None:
    """Write ``model.pt``: the config, the EMA weights, and ``about`` (diffusion, step, dataset_sha256, source)."""
    weights = {name: tensor.detach().cpu() for name, tensor in ema.items()}
    header = {"format_version": MODEL_FORMAT_VERSION, "model_config": config.to_dict()}
    save_torch({**header, "ema": weights, **about}, path)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, dict[str, Any]]:
    """The EMA model from ``model.pt`` (in eval mode, on ``device``) and the file's other entries."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path} not found: run `ddim train` first") from None
    except Exception as e:  # truncated, not a torch file, or holds objects that weights_only refuses
        raise ModelFileError(
            f"{path} is not a readable model file ({e.__class__.__name__}): run `ddim train` again"
        ) from None
    if not isinstance(state, dict) or not {"model_config", "ema"} <= state.keys():
        raise ModelFileError(f"{path} has no model_config and ema entries: it is not a model.pt of this pipeline")
    try:
        model = UNet(UNetConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["ema"])
    except (TypeError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise ModelFileError(f"{path} does not hold a U-Net of its own model_config ({first_line})") from None
    broken = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if broken:
        raise ModelFileError(
            f"{path} holds NaN or infinite weights ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}): "
            "it would sample blank images; train again or use an earlier checkpoint"
        )
    return model.to(device).eval(), state


def is_model_file(path: Path) -> bool:
    """Whether ``path`` is a model.pt this pipeline wrote (so that replacing it loses nothing of the user's)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(state, dict) and {"format_version", "model_config", "ema"} <= state.keys()


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names and raw bytes): equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_PATTERN.fullmatch(p.name))


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, then delete all but the newest ``keep`` checkpoints."""
    path = folder / f"ckpt-{step:08d}.pt"
    save_torch({"step": step, **state}, path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink()
    return path


def newest_checkpoint(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The newest readable checkpoint made with the same ``fingerprint``, or None (training starts over)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a checkpoint of ours after all: say so, try the one before
            warnings.warn(f"ignoring unreadable checkpoint {path} ({e.__class__.__name__})", stacklevel=2)
            continue
        if state.get("fingerprint") != fingerprint:
            made_with = state.get("fingerprint") or {}
            changed = sorted(k for k in fingerprint if made_with.get(k) != fingerprint[k])
            warnings.warn(
                f"the checkpoints in {folder} were made with other {', '.join(changed)} settings: training starts over",
                stacklevel=2,
            )
            return None
        return state
    return None
