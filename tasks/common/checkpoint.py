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
what the run was made with (its *recipe*: model, diffusion, the training params that change what is learned,
the data's checksum).

Each recipe has a folder of its own under ``paths.checkpoints``, ``<data name>-<recipe id>`` (the id: the
first 12 hex digits of the fingerprint's sha256), holding its checkpoints, ``recipe.json`` (the fingerprint,
for ``ddim checkpoints``), the MLflow run id and, with ``train.fid_every``, ``best.json``: the checkpoint with the
best training-time FID, which pruning never deletes. A run reads and prunes only its own recipe's folder, so
training another recipe never touches it; only the user deletes a recipe (``ddim checkpoints --delete``).
Checkpoints of the older flat layout (``paths.checkpoints/ckpt-*.pt``) are moved into their recipe's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from models.unet import UNet, UNetConfig
from tasks.common.errors import UserError
from tasks.common.files import exclusive, save_torch, write_json

MODEL_FILE = "model.pt"
MODEL_FORMAT_VERSION = 1
CKPT_PATTERN = re.compile(r"ckpt-(\d{8})\.pt")
RECIPE_FILE = "recipe.json"
BEST_FILE = "best.json"  # the checkpoint with the best training-time FID (never pruned)
RUN_ID_FILE = "mlflow_run_id"  # tasks.common.tracking's name for it, which this module may not import
RECIPE_DIR_PATTERN = re.compile(r"[A-Za-z0-9._-]*?-?([0-9a-f]{12})")


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


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt-{step:08d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int, protect: int | None = None) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, then :func:`prune_checkpoints`."""
    path = checkpoint_path(folder, step)
    save_torch({"step": step, **state}, path)
    prune_checkpoints(folder, keep, protect)
    return path


def prune_checkpoints(folder: Path, keep: int, protect: int | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints and the one of step ``protect`` (the best by training-time
    FID, :func:`read_best`)."""
    kept = {checkpoint_path(folder, protect)} if protect is not None else set()
    for old in list_checkpoints(folder)[:-keep]:
        if old not in kept:
            old.unlink()


def read_best(folder: Path) -> dict[str, Any] | None:
    """The recipe's best checkpoint by training-time FID (``best.json``: step, train_fid, how it was measured);
    None if there is none, the record cannot be read, or its checkpoint is gone."""
    try:
        best = json.loads((folder / BEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    whole = isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("measured_with"), dict)
    if not whole or not isinstance(best.get("train_fid"), int | float):
        return None
    return best if checkpoint_path(folder, best["step"]).is_file() else None  # deleted by hand: no best


def write_best(folder: Path, best: dict[str, Any]) -> None:
    write_json(best, folder / BEST_FILE)


def newest_checkpoint(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``folder`` made with ``fingerprint``, or None (training starts over).

    ``folder`` is the recipe's own (:func:`recipe_dir`), so a checkpoint of another fingerprint is not expected
    there; one is skipped with a warning, never deleted."""
    for path in reversed(list_checkpoints(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a checkpoint of ours after all: say so, try the one before
            warnings.warn(f"ignoring unreadable checkpoint {path} ({e.__class__.__name__})", stacklevel=2)
            continue
        try:
            made_with = upgrade_fingerprint(state)
        except Exception:  # not a dict, no fingerprint: not one of ours
            made_with = None
        if made_with != fingerprint:
            warnings.warn(f"ignoring {path}: it was made with another recipe than its folder's", stacklevel=2)
            continue
        return state
    return None


# ---------------------------------------------------------------------------------------------------------
# One folder per recipe
# ---------------------------------------------------------------------------------------------------------


def recipe_id(fingerprint: dict[str, Any]) -> str:
    """12 hex digits that name a recipe: the sha256 of its fingerprint as canonical JSON."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", name).strip("._") or "data"


def recipe_folders(root: Path) -> list[Path]:
    """The recipe folders under ``root``: plain folders ``<name>-<id>`` whose ``recipe.json`` names that id
    (a folder of the user's that merely looks like one is never listed, nor deleted by age)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _recipe_of(p) is not None)


def _recipe_of(folder: Path) -> dict[str, Any] | None:
    """``recipe.json`` of a recipe folder, or None for anything else."""
    match = RECIPE_DIR_PATTERN.fullmatch(folder.name)
    if not match or folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
        return None
    try:
        about = json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return about if isinstance(about, dict) and about.get("recipe") == match.group(1) else None


def recipe_dir(root: Path, fingerprint: dict[str, Any], data_name: str) -> Path:
    """The folder of ``fingerprint``'s checkpoints: the existing one with its id (whatever the data was called
    then), else ``<root>/<data name>-<id>``."""
    rid = recipe_id(fingerprint)
    for folder in recipe_folders(root):
        if RECIPE_DIR_PATTERN.fullmatch(folder.name).group(1) == rid:  # type: ignore[union-attr]
            return folder
    return root / f"{_slug(data_name)}-{rid}"


def write_recipe(folder: Path, fingerprint: dict[str, Any], data_name: str) -> None:
    """``recipe.json``: what the folder's checkpoints were made with, for ``ddim checkpoints``."""
    if not (folder / RECIPE_FILE).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        about = {"recipe": recipe_id(fingerprint), "data": data_name, "created": _now(), "fingerprint": fingerprint}
        write_json(about, folder / RECIPE_FILE)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def upgrade_fingerprint(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's fingerprint in today's form: those written before the global batch was the recipe's hold
    ``batch_size`` per process, and their params say how many processes there were."""
    fingerprint = state["fingerprint"]
    train = dict(fingerprint["train"])
    if "batch_size" in train:
        ran = state["params"]["train"]
        train["global_batch"] = train.pop("batch_size") * int(ran["nproc_per_node"]) * int(ran["nnodes"])
    return {**fingerprint, "train": train}


def adopt_flat_checkpoints(root: Path) -> list[str]:
    """Move checkpoints of the flat layout (``root/ckpt-*.pt``, one recipe at a time) into their recipe's folder,
    with the MLflow run id beside them. Returns what was moved, as lines. An unreadable file, or one whose name
    its folder already holds, stays where it is."""
    moved: list[str] = []
    newest_folder = None
    for path in list_checkpoints(root):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            fingerprint = upgrade_fingerprint(state)
            data_name = str(state["params"]["data"]["name"])
        except Exception as e:
            warnings.warn(f"left {path} where it is: not a readable checkpoint ({e.__class__.__name__})", stacklevel=2)
            continue
        folder = recipe_dir(root, fingerprint, data_name)
        if (folder / path.name).exists():
            warnings.warn(f"left {path} where it is: {folder} already holds a {path.name}", stacklevel=2)
            continue
        write_recipe(folder, fingerprint, data_name)
        try:
            os.replace(path, folder / path.name)
        except FileNotFoundError:  # another process moved it a moment ago
            continue
        moved.append(f"{path} -> {folder / path.name}")
        newest_folder = folder
    run_id = root / RUN_ID_FILE
    if newest_folder is not None and run_id.is_file() and not (newest_folder / RUN_ID_FILE).exists():
        os.replace(run_id, newest_folder / RUN_ID_FILE)  # the flat layout's run id was the newest run's
    return moved


@dataclass(frozen=True)
class Recipe:
    """One recipe folder, as ``ddim checkpoints`` lists it."""

    folder: Path
    fingerprint: dict[str, Any]
    data: str
    steps: list[int]
    size: int  # bytes of the whole folder
    last_written: float  # seconds since the epoch, of the newest file

    @property
    def name(self) -> str:
        return self.folder.name


def read_recipe(folder: Path) -> Recipe:
    """What the recipe folder ``folder`` holds: its fingerprint (``recipe.json``), steps, size, last write."""
    about = _recipe_of(folder) or {}
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return Recipe(
        folder=folder,
        fingerprint=about.get("fingerprint") if isinstance(about.get("fingerprint"), dict) else {},
        data=str(about.get("data", "?")),
        steps=[int(CKPT_PATTERN.fullmatch(p.name).group(1)) for p in list_checkpoints(folder)],  # type: ignore[union-attr]
        size=sum(p.stat().st_size for p in files),
        last_written=max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime),
    )


def _id_starts_with(folder: Path, name: str) -> bool:
    match = RECIPE_DIR_PATTERN.fullmatch(folder.name)
    return bool(match and len(name) >= 4 and match.group(1).startswith(name))


def find_recipes(root: Path, names: list[str]) -> list[Path]:
    """The recipe folders that ``names`` name: a folder name, or a recipe id (or its first 4+ digits)."""
    folders, found = recipe_folders(root), []
    for name in names:
        hits = [f for f in folders if f.name == name] or [f for f in folders if _id_starts_with(f, name)]
        if len(hits) != 1:
            known = ", ".join(f.name for f in folders) or "none"
            what = "matches several recipes" if hits else "is no recipe"
            raise UserError(f"{name!r} {what} in {root} (recipes: {known}): name one as `ddim checkpoints` lists it")
        found.append(hits[0])
    return found


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_recipes(recipes: list[Recipe]) -> list[dict[str, Any]]:
    """One row per recipe: its name, data, model in words, the recipe params that differ between the listed
    recipes, newest step, the step of its best training-time FID, checkpoint count, size and when it was last
    written."""
    flats = [_flat(r.fingerprint) for r in recipes]
    keys = sorted({k for f in flats for k in f} - {"dataset_sha256"})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    rows = []
    for recipe, flat in zip(recipes, flats, strict=True):
        m = recipe.fingerprint.get("model", {})
        model = f"ch{m.get('ch')} x{tuple(m.get('ch_mult', ()))} {m.get('image_size')}px" if m else "?"
        sha = str(recipe.fingerprint.get("dataset_sha256", ""))[:8]
        rows.append(
            {
                "recipe": recipe.name,
                "data": f"{recipe.data} ({sha})" if sha else recipe.data,
                "model": model,
                "differs": " ".join(f"{k.removeprefix('train.')}={flat.get(k)}" for k in varying),
                "newest_step": recipe.steps[-1] if recipe.steps else None,
                "best_fid_step": best["step"] if (best := read_best(recipe.folder)) else None,  # train.fid_every
                "checkpoints": len(recipe.steps),
                "size_mb": round(recipe.size / 2**20, 1),
                "last_written": datetime.fromtimestamp(recipe.last_written).strftime("%Y-%m-%d %H:%M"),
            }
        )
    return rows


def delete_recipe(folder: Path) -> None:
    """Delete one recipe's folder, unless a run is writing it (its lock is held)."""
    with exclusive(folder, "`ddim checkpoints --delete`"):  # its lock file stays: unlinked, two could hold it
        shutil.rmtree(folder)


def older_than(recipes: list[Recipe], date: str) -> list[Recipe]:
    """The recipes whose newest file was written before ``date`` (ISO 8601, e.g. 2026-11-30)."""
    try:
        when = datetime.fromisoformat(date)
    except ValueError:
        raise UserError(f"--older-than {date!r} is not a date: write it as YYYY-MM-DD (or YYYY-MM-DDTHH:MM)") from None
    cutoff = when.timestamp() if when.tzinfo else time.mktime(when.timetuple())
    return [r for r in recipes if r.last_written < cutoff]
