"""The sample stage: generate ``sample.num_samples`` images from ``model.pt`` with ``sample.sampler``.

Image i starts from noise seeded by (``sample.seed``, i) (``tasks/common/inference.py``): it is the same image whatever
the batch size, the device, or how many processes draw the images (``sample.nproc_per_node > 1``: ``ddim
sample`` runs ``torchrun``, and rank r of W draws images r, r + W, ...). Output in ``paths.samples``:

- ``images/{i:06d}.png``, each written atomically (no truncated PNG, ever);
- ``grid.png``: the first 64; ``sample_stats.json``: NFE mean/min/max, wall time, images/s;
- ``nfe.rank<r>.npy`` (model evaluations per image, as each process wrote them) and ``config.json`` (what
  made the images), which let a rerun after a kill continue with the batch holding the first missing image;
  a different config starts over. A rerun that finds every image made by the same config changes nothing.

Starting over deletes only these files. A folder that holds anything else (or a ``config.json`` this stage
did not write) is refused with one line, before any file in it is touched.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.checkpoint import MODEL_FILE
from tasks.common.config import Params, SampleConfig
from tasks.common.devices import pick_device
from tasks.common.distributed import Ranks
from tasks.common.errors import UserError
from tasks.common.files import atomic_path, file_hash, foreign_entries, write_json
from tasks.common.images import make_grid, read_png, save_png, to_uint8
from tasks.common.inference import InferenceModel, batches, load_inference
from tasks.common.progress import progress_bar
from tasks.common.tracking import NullTracker, evaluation_name, read_run_id, tracked_run

IMAGES = "images"
OWN_FILES = re.compile(r"config\.json|sample_stats\.json|grid\.png|nfe\.rank\d+\.npy|\..+\.tmp")
OWN_IMAGES = re.compile(r"\d{6}\.png|\..+\.tmp")  # .tmp: an atomic write cut short by a kill


class SampleOutputError(UserError):
    """``paths.samples`` holds files the sample stage did not write."""


def image_path(folder: Path, index: int) -> Path:
    return folder / IMAGES / f"{index:06d}.png"


def leading_done(folder: Path, indices: list[int]) -> int:
    """How many of ``indices``, in order, already exist (PNGs are written atomically: existing ones are whole)."""
    k = 0
    while k < len(indices) and image_path(folder, indices[k]).is_file():
        k += 1
    return k


def count_done(folder: Path, total: int) -> int:
    return sum(image_path(folder, i).is_file() for i in range(total))


def sampling_identity(cfg: SampleConfig, model_path: Path) -> dict[str, Any]:
    """What makes the images: the sampling keys that can change them (not the settings of other samplers: a
    new ``order`` redraws no DDIM image), and the model file's sha256."""
    unused = {key for key, value in cfg.settings().items() if value is None}
    return {"sample": cfg.model_dump(include=set(cfg.result_keys()) - unused), "model_sha256": file_hash(model_path)}


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_identity(config_path: Path) -> dict[str, Any] | None:
    """The identity a ``config.json`` of this stage records; None if there is none or it is not ours."""
    identity = read_json(config_path)
    return identity if identity is not None and set(identity) == {"sample", "model_sha256"} else None


def open_output(out: Path, identity: dict[str, Any], num_samples: int) -> dict[str, Any] | None:
    """Make ``out`` ready for the images ``identity`` describes; their stats if every one is already there.

    A folder of this stage's files made by another config or model starts over (its files are deleted, one
    by one); a folder holding anything else is an error, and nothing in it is touched.
    """
    config_path, stats_path = out / "config.json", out / "sample_stats.json"
    if out.exists() and not out.is_dir():
        raise SampleOutputError(f"paths.samples={out} is a file, not a folder: point it at a new or empty folder")
    if out.is_dir():
        foreign, recorded = foreign_entries(out, OWN_FILES, {IMAGES: OWN_IMAGES}), read_identity(config_path)
        if config_path.exists() and recorded is None:
            foreign.insert(0, "config.json (not written by ddim sample)")
        if foreign:
            listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise SampleOutputError(
                f"paths.samples={out} holds files that ddim sample did not write ({listed}): "
                f"point paths.samples at a new or empty folder"
            )
        if recorded != identity:
            delete_own_files(out)
        else:
            delete_leftovers(out)  # half-written files of a killed run: their images are drawn again
            stats = read_json(stats_path)  # unreadable (a kill mid-write cannot do it): sampled again
            if stats and stats.get("complete") and count_done(out, num_samples) == num_samples:
                return stats
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    write_json(identity, config_path)
    return None


def delete_leftovers(out: Path) -> None:
    """Delete the temporary files a killed run of this stage left in ``out`` (never a finished file)."""
    for folder in (out / IMAGES, out):
        for entry in folder.glob(".*.tmp") if folder.is_dir() else ():
            if entry.is_file():
                entry.unlink()


def delete_own_files(out: Path) -> None:
    """Delete this stage's files from ``out`` (which ``foreign_entries`` found to hold nothing else)."""
    for folder in (out / IMAGES, out):
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.is_file():
                entry.unlink()


def generate(
    net: InferenceModel, cfg: SampleConfig, out: Path, ranks: Ranks, stop_after_batches: int | None = None
) -> int:
    """Write this process's missing images batch by batch (and their NFE); return how many it made.

    It continues with the batch holding its first missing image, so batches match an uninterrupted run (the
    adaptive sampler's design mode couples the samples of a batch).
    """
    mine = ranks.share(cfg.num_samples)
    nfe_path = out / f"nfe.rank{ranks.rank}.npy"
    nfe = np.load(nfe_path) if nfe_path.is_file() else np.full(cfg.num_samples, -1, dtype=np.int64)
    start = leading_done(out, mine) // cfg.batch_size * cfg.batch_size
    todo = list(batches(mine[start:], cfg.batch_size))[:stop_after_batches]
    with progress_bar(total=len(mine), initial=start, desc="sample", unit="img", disable=not ranks.is_main) as bar:
        for indices in todo:
            x0, batch_nfe = net.sample(cfg, indices)
            for i, img in zip(indices, to_uint8(x0), strict=True):
                save_png(img, image_path(out, i))
            nfe[indices] = batch_nfe.numpy()
            with atomic_path(nfe_path) as tmp, open(tmp, "wb") as f:
                np.save(f, nfe)
            bar.update(len(indices))
    return sum(len(b) for b in todo)


def merged_nfe(out: Path, total: int) -> np.ndarray:
    """Each image's model evaluations, from every process's file (-1 where no process recorded it)."""
    files = [np.load(p) for p in sorted(out.glob("nfe.rank*.npy"))]
    return np.max([f for f in files if len(f) == total], axis=0) if files else np.full(total, -1)


def write_stats(out: Path, cfg: SampleConfig, device: str, precision: str) -> dict:
    """``sample_stats.json`` and ``grid.png`` of the folder as it now is: what the images are, not how long this
    run took (the folder is a DVC output, identical whenever its images are)."""
    nfe = merged_nfe(out, cfg.num_samples)
    done = count_done(out, cfg.num_samples)
    made = nfe[nfe >= 0]
    stats = {
        "num_samples": done,
        "complete": done == cfg.num_samples,
        **cfg.settings(),  # the sampler and its settings (None where one does not apply to it)
        "nfe_mean": float(made.mean()) if len(made) else None,
        "nfe_min": int(made.min()) if len(made) else None,
        "nfe_max": int(made.max()) if len(made) else None,
        "device": device,
        "precision": precision,
    }
    first = [i for i in range(min(64, cfg.num_samples)) if image_path(out, i).is_file()]
    if first:
        save_png(make_grid(np.stack([read_png(image_path(out, i)) for i in first])), out / "grid.png")
    write_json(stats, out / "sample_stats.json")
    return stats


def sampling_run(params: Params, device: str, precision: str, ranks: Ranks) -> contextlib.AbstractContextManager:
    """The MLflow child run of the training run that records this sampling run while it works (rank 0): its
    settings, its speed, and the machine's utilisation (``tracking.system_metrics``)."""
    if not ranks.is_main:
        return contextlib.nullcontext(NullTracker())
    cfg = params.sample
    settings = cfg.own_settings()
    name = f"sample-{evaluation_name(settings)}"
    tags = {"stage": "sample", "device": device, "precision": precision}
    logged = {"sample": {**settings, "num_samples": cfg.num_samples, "seed": cfg.seed}}
    return tracked_run(params.tracking, read_run_id(Path(params.paths.train)), name, logged, tags)


def run(params: Params, *, stop_after_batches: int | None = None) -> dict[str, Any]:
    """Generate the configured samples (continuing an interrupted run); ``sample_stats`` and this run's timing
    (rank 0; others: {})."""
    cfg, ranks = params.sample, Ranks.from_env()
    device = pick_device(cfg.device, ranks.local_rank)
    net = load_inference(params, device)
    model_path = Path(params.paths.train) / MODEL_FILE
    ranks.start(device)
    try:
        out = Path(params.paths.samples)
        finished = open_output(out, sampling_identity(cfg, model_path), cfg.num_samples) if ranks.is_main else None
        finished = ranks.broadcast(finished)  # the others wait until rank 0 has the folder ready
        if finished is not None:
            return finished if ranks.is_main else {}  # every image is there, made by this config: nothing to do
        with sampling_run(params, str(device), net.precision, ranks) as tracker:
            begin = time.perf_counter()
            generated = ranks.sum(generate(net, cfg, out, ranks, stop_after_batches))
            seconds = time.perf_counter() - begin
            if not ranks.is_main:
                return {}
            timing = {"wall_seconds": round(seconds, 2), "images_generated_now": generated}
            timing["images_per_s"] = round(generated / seconds, 2) if generated else None
            tracker.log_metrics({k: v for k, v in timing.items() if v is not None}, 0)
        return {**write_stats(out, cfg, str(device), net.precision), **timing}
    finally:
        ranks.finish()
