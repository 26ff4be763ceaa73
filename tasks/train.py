"""The train stage: fit the U-Net eps-model with the design's complexity-weighted loss.

One process, or one rank of a ``torchrun`` job (DDP: nccl on CUDA, gloo on CPU); ``python -m tasks.train``
is the per-rank entry point that ``ddim train`` hands to torchrun when ``train.nproc_per_node > 1``.

Each step (DDPM's algorithm 1 with the design's loss): x0 from the prepared dataset, flipped at random;
t ~ U{0..T-1}; eps ~ N(0, I); loss = mean((eps_theta(x_t, t) - eps)^2) + lambda_reg * mean(c * |...|) with
c = compute_complexity(x0). Adam with linear warm-up, gradient clipping, an EMA of the weights.

Reproducibility: all randomness of step s on rank r (timesteps, noise, flips, dropout) is drawn after
seeding torch from (train.seed, r, s), and the data order of epoch e comes from (train.seed, e). The
random state at any step is therefore a function of the step, which a checkpoint stores; a run killed and
resumed takes exactly the steps an uninterrupted run takes (bit-exact on CPU with train.deterministic).

Files (rank 0 only): checkpoints ``ckpt-<step>.pt`` in ``paths.checkpoints`` (atomic, the newest K kept) with
the MLflow run id beside them; ``model.pt`` (EMA weights + configs: what sampling loads),
``train_metrics.csv`` and ``mlflow_run_id`` in ``paths.train``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from models.diffusion import (
    alphas_cumprod_from_betas,
    compute_complexity,
    ddim_sample,
    ddim_timesteps,
    loss_terms,
    make_beta_schedule,
    q_sample,
)
from models.unet import UNet, UNetConfig
from tasks.config import DiffusionConfig, Params, load_params
from tasks.data import PreparedDataset, dataset_dir, to_uint8
from tasks.devices import autocast_dtype, pick_device
from tasks.errors import UserError
from tasks.images import atomic_path, make_grid
from tasks.tracking import NullTracker, Tracker, git_commit, write_run_id

CKPT_PATTERN = re.compile(r"ckpt-(\d{8})\.pt")
METRICS_FIELDS = ["step", "loss", "mse", "complexity_term", "lr", "grad_norm", "images_per_s"]


class TrainingError(UserError):
    """Training cannot start or had to stop (bad data, NaN loss, incompatible checkpoint)."""


class TrainingInterruptedError(UserError):
    """SIGTERM or SIGINT arrived; a checkpoint was written first."""


# ---------------------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------------------


def alphas_cumprod_for(cfg: DiffusionConfig) -> torch.Tensor:
    betas = make_beta_schedule(cfg.schedule, cfg.num_train_steps, cfg.beta_start, cfg.beta_end)
    return alphas_cumprod_from_betas(betas)


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up from ~0 to ``base_lr`` over ``warmup`` steps, then constant (DDPM)."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SkipSampler(Sampler[int]):
    """The indices of ``sampler`` after the first ``skip``: resuming mid-epoch without reading skipped data."""

    def __init__(self, sampler: DistributedSampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_PATTERN.fullmatch(p.name))


def save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGINT while the block runs (main thread only; elsewhere never set)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: event.set())
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class MetricsCSV:
    """``train_metrics.csv``, appended one row per log step; rows past a resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, METRICS_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.file = open(path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        self.writer = csv.DictWriter(self.file, METRICS_FIELDS)

    def write(self, row: dict[str, float]) -> None:
        self.writer.writerow({k: row[k] for k in METRICS_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        )


# Train params that do not change what is learned: a checkpoint made under other values can be resumed.
RESUMABLE_ACROSS = {
    "steps",
    "log_every",
    "sample_every",
    "sample_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "resume",
    "nproc_per_node",
    "num_workers",
    "device",
    "compile",
}


def training_fingerprint(params: Params, dataset_sha256: str) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the model, the diffusion, the recipe and the data."""
    recipe = {k: v for k, v in params.train.model_dump().items() if k not in RESUMABLE_ACROSS}
    return {
        "model": params.model.unet_config(params.data.image_size).to_dict(),
        "diffusion": params.diffusion.model_dump(),
        "train": recipe,
        "dataset_sha256": dataset_sha256,
    }


def _load_resume_state(params: Params, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The newest readable checkpoint made by the same fingerprint, or None (then training starts over)."""
    if params.train.resume == "never":
        return None
    for path in reversed(list_checkpoints(Path(params.paths.checkpoints))):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a checkpoint of ours after all: say so, try the one before
            warnings.warn(f"ignoring unreadable checkpoint {path} ({e.__class__.__name__})", stacklevel=2)
            continue
        if state.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
            warnings.warn(
                f"the checkpoints in {path.parent} were made with other {', '.join(changed)} settings: "
                f"training starts over",
                stacklevel=2,
            )
            return None
        return state
    return None


def _sample_grid(
    ema: torch.nn.Module, params: Params, alphas_cumprod: torch.Tensor, device: torch.device
) -> np.ndarray:
    """16 EMA samples (DDIM, eta 0, x0 clipped, fixed noise) as a uint8 grid image."""
    size = params.data.image_size
    g = torch.Generator().manual_seed(params.train.seed)
    x_T = torch.randn(16, 3, size, size, generator=g).to(device)
    steps = min(params.train.sample_steps, params.diffusion.num_train_steps)
    timesteps = ddim_timesteps(params.diffusion.num_train_steps, steps, "trailing")
    was_training = ema.training
    ema.eval()
    x0 = ddim_sample(ema, x_T, alphas_cumprod, timesteps, eta=0.0, clip_x0=True)
    ema.train(was_training)
    return make_grid(to_uint8(x0), nrow=4)


def train(
    params: Params,
    *,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) training as configured; return a summary. ``stop_after`` ends early (tests)."""
    cfg = params.train
    dist_info = Dist.from_env()
    distributed = dist_info.world_size > 1
    device = pick_device(cfg.device, dist_info.local_rank)
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dataset = PreparedDataset(dataset_dir(params.data, params.paths))
    if dataset.manifest["height"] != params.data.image_size:
        raise TrainingError(
            f"the prepared dataset is {dataset.manifest['height']} px but data.image_size is "
            f"{params.data.image_size}: run `ddim prepare` again"
        )
    global_batch = cfg.batch_size * dist_info.world_size
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(
            f"the dataset has {len(dataset)} images, fewer than one global batch of {global_batch} "
            f"(train.batch_size x processes): lower train.batch_size or prepare more images"
        )

    unet_config = params.model.unet_config(params.data.image_size)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = UNet(unet_config).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    alphas_cumprod = alphas_cumprod_for(params.diffusion).to(device)
    alphas_cumprod_f32 = alphas_cumprod.float()

    fingerprint = training_fingerprint(params, dataset.manifest["sha256"])
    state = _load_resume_state(params, fingerprint)
    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])

    ddp = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if distributed
        else model
    )
    forward = torch.compile(ddp) if cfg.compile else ddp

    ckpt_dir, out_dir = Path(params.paths.checkpoints), Path(params.paths.train)
    tracker: NullTracker = NullTracker()
    metrics_csv = None
    if dist_info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            for old in list_checkpoints(ckpt_dir):  # resume=never, or nothing usable: start clean
                old.unlink()
            (ckpt_dir / "mlflow_run_id").unlink(missing_ok=True)
        tags = {
            "mlflow.source.git.commit": git_commit(),
            "dataset.sha256": dataset.manifest["sha256"],
            "dataset.name": params.data.name,
            "stage": "train",
        }
        tracker = Tracker.for_training(params.tracking, params.model_dump(mode="json"), tags, ckpt_dir)
        write_run_id(tracker.run_id, out_dir)
        metrics_csv = MetricsCSV(out_dir / "train_metrics.csv", start_step)

    def checkpoint(step: int) -> None:
        if not dist_info.is_main:
            return
        save_torch(
            {
                "step": step,
                "model_config": unet_config.to_dict(),
                "diffusion": params.diffusion.model_dump(),
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                # The random state of step s is re-derived from (seed, rank, s), so `step` is the RNG state.
                "rng": {"scheme": "torch.manual_seed(SeedSequence([seed, rank, step]))", "seed": cfg.seed},
                "params": params.model_dump(mode="json"),
                "mlflow_run_id": tracker.run_id,
            },
            ckpt_dir / f"ckpt-{step:08d}.pt",
        )
        for old in list_checkpoints(ckpt_dir)[: -cfg.keep_checkpoints]:
            old.unlink()

    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not dist_info.is_main)
    sums = torch.zeros(3, device=device)  # loss, mse, complexity term, summed between log steps
    grad_norm = torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def stop_if_nonfinite() -> None:
        """Raise if any step so far had a NaN/inf loss (a host sync: only at log and checkpoint steps)."""
        if bad_step.item() >= 0:
            raise TrainingError(
                f"the loss became NaN or inf at step {bad_step.item() + 1}; the last good checkpoint in "
                f"{ckpt_dir} is kept: lower train.lr or use train.precision=fp32"
            )

    last = {"loss": float("nan")}
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    status = "FAILED"
    model.train()
    ema.train()
    try:
        with stop_on_signals() as stop_requested:
            while step < end_step:
                epoch, offset = divmod(step, steps_per_epoch)
                sampler = DistributedSampler(
                    dataset, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.seed, drop_last=True
                )
                sampler.set_epoch(epoch)
                loader = DataLoader(
                    dataset,
                    batch_size=cfg.batch_size,
                    sampler=SkipSampler(sampler, offset * cfg.batch_size),
                    drop_last=True,
                    num_workers=cfg.num_workers,
                    pin_memory=device.type == "cuda",
                )
                for x0 in loader:
                    torch.manual_seed(step_seed(cfg.seed, dist_info.rank, step))
                    x0 = x0.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                    if cfg.random_flip:
                        flip = torch.rand(x0.shape[0], device=device) < 0.5
                        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                    t = torch.randint(0, params.diffusion.num_train_steps, (x0.shape[0],), device=device)
                    noise = torch.randn_like(x0)
                    x_t = q_sample(x0, t, noise, alphas_cumprod_f32)
                    lr = lr_at(step, cfg.lr, cfg.warmup)
                    for group in optimizer.param_groups:
                        group["lr"] = lr

                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        eps_pred = forward(x_t, t)
                    squared_error, complexity_term = loss_terms(
                        eps_pred.float(), noise, compute_complexity(x0, cfg.complexity_mode)
                    )
                    mse, cterm = squared_error.mean(), complexity_term.mean()
                    loss = mse + cfg.lambda_reg * cterm

                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    ema.update_parameters(model)

                    finite = torch.isfinite(loss)
                    bad_step = torch.where(~finite & (bad_step < 0), step, bad_step)
                    sums += torch.stack([loss, mse, cterm]).detach()
                    step += 1
                    window_steps += 1
                    bar.update(1)

                    at_log = step % cfg.log_every == 0 or step == end_step
                    if at_log:
                        if distributed:
                            dist.all_reduce(sums)
                            dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
                            sums /= dist_info.world_size
                        stop_if_nonfinite()
                        elapsed = time.perf_counter() - window_start
                        values = (sums / window_steps).tolist()
                        last = {
                            "step": step,
                            "loss": values[0],
                            "mse": values[1],
                            "complexity_term": values[2],
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "images_per_s": window_steps * global_batch / elapsed,
                        }
                        if metrics_csv is not None:
                            metrics_csv.write(last)
                        tracker.log_metrics({k: v for k, v in last.items() if k != "step"}, step)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}")
                        if progress is not None and dist_info.is_main:
                            progress(step, cfg.steps, last)
                        sums.zero_()
                        window_start, window_steps = time.perf_counter(), 0

                    if dist_info.is_main and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                        tracker.log_image(
                            _sample_grid(ema.module, params, alphas_cumprod, device), f"samples/step_{step:08d}.png"
                        )
                    stop = stop_requested.is_set()
                    if distributed and at_log:
                        flag = torch.tensor(float(stop), device=device)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        stop = bool(flag.item())
                    if step % cfg.checkpoint_every == 0 or step == end_step or (stop and (at_log or not distributed)):
                        stop_if_nonfinite()  # never checkpoint weights that a NaN has reached
                        checkpoint(step)
                    if stop and (at_log or not distributed):
                        status = "KILLED"
                        raise TrainingInterruptedError(f"stopped at step {step}: checkpoint written, rerun to resume")
                    if step >= end_step:
                        break

        summary: dict[str, Any] = {"step": step, "resumed_from": start_step, "mlflow_run_id": tracker.run_id, **last}
        if distributed:
            digests: list[str | None] = [None] * dist_info.world_size
            dist.all_gather_object(digests, weights_digest(model))
            summary["ranks_in_sync"] = len(set(digests)) == 1
            if not summary["ranks_in_sync"]:
                raise TrainingError("ranks ended with different weights: the DDP job is inconsistent")
        if dist_info.is_main and step >= cfg.steps:
            model_path = out_dir / "model.pt"
            save_torch(
                {
                    "model_config": unet_config.to_dict(),
                    "diffusion": params.diffusion.model_dump(),
                    "ema": ema.module.state_dict(),
                    "step": step,
                    "dataset_sha256": dataset.manifest["sha256"],
                    "params": params.model_dump(mode="json"),
                    "mlflow_run_id": tracker.run_id,
                },
                model_path,
            )
            grid = _sample_grid(ema.module, params, alphas_cumprod, device)
            tracker.log_image(grid, f"samples/step_{step:08d}.png")
            tracker.log_artifact(model_path)
            summary["model"] = str(model_path)
            summary["weights_sha256"] = weights_digest(ema.module)
        status = "FINISHED"
        return summary
    finally:
        bar.close()
        if metrics_csv is not None:
            metrics_csv.close()
        if status != "FINISHED" or step >= cfg.steps:
            tracker.finish(status)
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, dict[str, Any]]:
    """The EMA model from ``model.pt`` (eval mode) and the file's metadata."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = UNet(UNetConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["ema"])
    return model.to(device).eval(), state


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point (``torchrun ... -m tasks.train --params FILE --set k=v``)."""
    parser = argparse.ArgumentParser(description="one training process (or rank)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        summary = train(load_params(args.params, args.overrides), stop_after=args.stop_after)
    except UserError as e:
        print(f"ddim train: error: {e}", file=sys.stderr)
        return 1
    if Dist.from_env().is_main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
