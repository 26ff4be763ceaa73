"""The train stage: fit the U-Net eps-model with the design's complexity-weighted loss.

One process, or one rank of a ``torchrun`` job (DDP: nccl on CUDA, gloo on CPU), which ``ddim train`` starts
(``python -m pipelines.ranks train``) when ``train.nproc_per_node > 1``.

Training, in four pieces (improved-diffusion's and EDM's shape):

1. :func:`build_trainer` builds everything once: the model, its EMA, the optimizer, the data, and the state of
   the newest compatible checkpoint.
2. :func:`train_step` is one optimization step, the hot part: DDPM's algorithm 1 with the design's loss
   (:func:`models.diffusion.training_losses`), Adam with linear warm-up, gradient clipping, the EMA update.
   With ``train.compile`` its forward and backward pass are what ``torch.compile`` compiles; on CUDA
   (``train.cuda_graphs``) the whole step is :class:`GraphedStep` instead, captured once as a CUDA graph and
   replayed, and with ``train.data_on_device`` its batches are gathered in device memory (:func:`batches`).
3. :class:`Bookkeeping` does the periodic maintenance: metric rows, the NaN check, checkpoints, sample grids,
   stopping on SIGTERM/SIGINT.
4. :func:`export` writes ``model.pt`` and its ``train_run.json`` sidecar.

Reproducibility: all randomness of step s on rank r (flips, timesteps, noise, dropout) is drawn after
seeding torch from (train.seed, r, s), and the data order of epoch e comes from (train.seed, e). The
random state at any step is therefore a function of the step, which a checkpoint stores; a run killed and
resumed takes exactly the steps an uninterrupted run takes (bit-exact on CPU with train.deterministic).

Files (rank 0 only): checkpoints ``ckpt-<step>.pt`` in the recipe's own folder under ``paths.checkpoints``
(``tasks/common/checkpoint.py``; atomic, the newest K kept, other recipes' folders never touched) with the MLflow run
id beside them; ``model.pt`` (``tasks/common/checkpoint.py``), ``train_run.json``,
``train_metrics.csv`` (with its last row in ``train_metrics.json``: DVC's top-level plot and metric) and
``mlflow_run_id`` in ``paths.train``. Only ``model.pt`` is the stage's result (its DVC output); the others record
the run (which MLflow run, device, speed), so a rerun that makes the same model changes nothing DVC tracks.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import shutil
import signal
import sys
import tempfile
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

from models.diffusion import ddim_sample, ddim_timesteps, training_losses
from models.unet import UNet
from tasks.common.checkpoint import (
    BEST_FILE,
    MODEL_FILE,
    adopt_flat_checkpoints,
    checkpoint_path,
    list_checkpoints,
    newest_checkpoint,
    prune_checkpoints,
    read_best,
    recipe_dir,
    save_checkpoint,
    save_model,
    weights_digest,
    write_best,
    write_recipe,
)
from tasks.common.config import Params, TrainConfig
from tasks.common.dataset import DeviceImages, PreparedDataset, dataset_dir
from tasks.common.devices import autocast_dtype, on_device, pick_device, set_precision
from tasks.common.distributed import Ranks
from tasks.common.errors import UserError
from tasks.common.fid import EvaluationError, frechet_distance, load_stats, reference_path
from tasks.common.files import atomic_path, exclusive, file_hash, project_path, write_json
from tasks.common.graphs import Graphed
from tasks.common.images import make_grid, to_uint8
from tasks.common.inception import load_inception
from tasks.common.inference import InferenceModel
from tasks.common.logged_model import ModelUpload
from tasks.common.pretrained import read_source, write_imported
from tasks.common.progress import progress_bar
from tasks.common.scoring import draw_features
from tasks.common.seeds import derive_seed
from tasks.common.tracking import NullTracker, SystemMetrics, Tracker, git_commit, write_or_forget_run_id

METRICS_FIELDS = ["step", "loss", "mse", "complexity_term", "lr", "grad_norm", "images_per_s"]
FID_FIELDS = ["step", "fid", "num_samples", "seconds"]
FID_FILE = "train_fid.csv"  # the training-time FID curve (train.fid_every): DVC's top-level plot beside the loss's
RUN_FILE = "train_run.json"
FINAL_FILE = "train_metrics.json"  # the last metric row: what `dvc exp show` and `dvc metrics diff` show

# Train keys that a checkpoint may differ in and still be resumed: those that cannot change what is learned
# (the runtime keys of TrainConfig), plus more steps, another process count or compiling. The per-process
# batch_size is replaced by the global batch (batch_size x processes), which is what the recipe learns with.
RUNTIME_KEYS = set(TrainConfig.model_fields) - set(TrainConfig.result_keys())
RESUMABLE_ACROSS = RUNTIME_KEYS | {"steps", "nproc_per_node", "nnodes", "compile", "batch_size"}


class TrainingError(UserError):
    """Training cannot start or had to stop (bad data, NaN loss, incompatible checkpoint)."""


class TrainingInterruptedError(UserError):
    """SIGTERM or SIGINT arrived; a checkpoint was written first."""


# ---------------------------------------------------------------------------------------------------------
# 1. The run's state, built once
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Everything one training process holds. ``model`` owns the weights; ``losses`` runs the forward pass
    and the loss through DDP (under torchrun), autocast and, with ``train.compile``, the compiled graph."""

    params: Params
    dist: Ranks
    device: torch.device
    precision: str  # what train.precision resolved to here: bf16, fp16 or fp32
    amp_dtype: torch.dtype | None  # autocast's dtype for that precision (None: fp32, no autocast)
    graphs: bool  # the step is GraphedStep (train.cuda_graphs), not train_step
    dataset: PreparedDataset
    images: DeviceImages | None  # the dataset in device memory (train.data_on_device), else None: a DataLoader
    model: UNet
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    losses: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    alphas_cumprod: torch.Tensor  # on the device (float32 on MPS, float64 elsewhere)
    fingerprint: dict[str, Any]
    start_step: int
    checkpoints: Path  # this recipe's own folder under paths.checkpoints

    @property
    def cfg(self) -> TrainConfig:
        return self.params.train

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size


def training_fingerprint(params: Params, dataset_sha256: str, world_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the model, the diffusion, the recipe and the data.

    The recipe holds the global batch, not the per-process one: 2 processes x 64 continue a run of 1 x 128 (the
    same images in each step; each image's noise is drawn on another rank), while 2 x 128 is another recipe
    with a folder of its own, so a resumed run never changes its batch in the middle."""
    recipe = {k: v for k, v in params.train.model_dump().items() if k not in RESUMABLE_ACROSS}
    recipe["global_batch"] = params.train.batch_size * world_size
    return {
        "model": params.model.unet_config(params.data.image_size).to_dict(),
        "diffusion": params.diffusion.model_dump(),
        "train": recipe,
        "dataset_sha256": dataset_sha256,
    }


def open_checkpoints(
    params: Params, fingerprint: dict[str, Any], dist_info: Ranks, locks: contextlib.ExitStack | None
) -> tuple[Path, dict[str, Any] | None]:
    """This recipe's checkpoint folder and the state to resume from (None: start at step 0).

    Rank 0 moves the flat layout into recipe folders, locks this recipe's folder for as long as ``locks``
    lasts (None: not locked, for benchmarks that only step) and checks it; its verdict reaches every rank, so
    all of them raise the same error or resume the same checkpoint (no other process can write it meanwhile).
    """
    folder, state, problem = None, None, None
    if dist_info.is_main:
        try:
            folder, state = _claim_checkpoints(params, fingerprint, locks)
        except Exception as e:  # the others must not wait for a rank 0 that has stopped
            problem = e
    verdict, folder = dist_info.broadcast((None if problem is None else str(problem), folder))
    if problem is not None:
        raise problem
    if verdict is not None:
        raise TrainingError(verdict)
    if not dist_info.is_main:  # rank 0 holds the lock: the same file it loaded
        state = newest_checkpoint(folder, fingerprint) if params.train.resume == "auto" else None
    return folder, state


def _claim_checkpoints(
    params: Params, fingerprint: dict[str, Any], locks: contextlib.ExitStack | None
) -> tuple[Path, dict[str, Any] | None]:
    """Rank 0's part of :func:`open_checkpoints`: adopt, lock, load, refuse what would write over checkpoints."""
    root = project_path(params.paths.checkpoints)  # the project's, also for a queued DVC experiment
    for line in adopt_flat_checkpoints(root):
        print(f"moved into its recipe's folder: {line}", file=sys.stderr)
    folder = recipe_dir(root, fingerprint, params.data.name)
    if locks is not None:
        locks.enter_context(exclusive(folder, "`ddim train`"))
    held = list_checkpoints(folder)
    if held and params.train.resume == "never":
        raise TrainingError(
            f"train.resume is never, but {folder} holds checkpoints of this recipe up to step "
            f"{held[-1].stem[5:].lstrip('0') or 0}: delete them first "
            f"(ddim checkpoints --delete {folder.name}), or set train.resume=auto to continue them"
        )
    state = newest_checkpoint(folder, fingerprint) if params.train.resume == "auto" else None
    if held and params.train.resume == "auto" and state is None:
        raise TrainingError(  # starting over would, in time, write over and prune them
            f"none of the {len(held)} checkpoints in {folder} can be read: move them away, or delete them "
            f"(ddim checkpoints --delete {folder.name})"
        )
    write_recipe(folder, fingerprint, params.data.name)
    return folder, state


def setup_process(cfg: TrainConfig, dist_info: Ranks) -> torch.device:
    """This process's device, the process group under torchrun, and the kernel-selection flags."""
    device = pick_device(cfg.device, dist_info.local_rank)
    dist_info.start(device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def open_dataset(params: Params, global_batch: int) -> PreparedDataset:
    dataset = PreparedDataset(dataset_dir(params.data, params.paths))
    if dataset.manifest["height"] != params.data.image_size:
        raise TrainingError(
            f"the prepared dataset is {dataset.manifest['height']} px but data.image_size is "
            f"{params.data.image_size}: run `ddim prepare` again"
        )
    if len(dataset) < global_batch:
        raise TrainingError(
            f"the dataset has {len(dataset)} images, fewer than one global batch of {global_batch} "
            f"(train.batch_size x processes): lower train.batch_size or prepare more images"
        )
    return dataset


def _forward_losses(
    model: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    lambda_reg: float,
    complexity_mode: str,
    amp_dtype: torch.dtype | None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """The per-sample losses of one batch, with the network under autocast when ``amp_dtype`` is set (without
    autocast's cache of cast weights when ``cache`` is false, as a captured graph needs)."""
    enabled = amp_dtype is not None
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=enabled, cache_enabled=cache):
        return training_losses(
            model, x0, t, noise, alphas_cumprod, lambda_reg=lambda_reg, complexity_mode=complexity_mode
        )


def graph_plan(cfg: TrainConfig, device: torch.device, precision: str) -> tuple[bool, str | None]:
    """Whether the step runs as :class:`GraphedStep` (``train.cuda_graphs``), and the reason to say, if any,
    where the setting and the outcome differ."""
    if cfg.cuda_graphs is False or (cfg.cuda_graphs == "auto" and device.type != "cuda"):
        return False, None
    if precision == "fp16":
        return False, "fp16's GradScaler decides on the host whether each step is taken, which a graph cannot hold"
    if cfg.compile:
        return False, "train.compile is on: the compiled step runs instead"
    if device.type != "cuda":
        return True, "no CUDA device here: the graph's step runs, uncaptured"
    return True, None


def build_trainer(params: Params, locks: contextlib.ExitStack | None = None) -> Trainer:
    """Build the model, EMA, optimizer and data; load the newest checkpoint of the same recipe (fingerprint).
    ``locks`` holds the recipe folder's lock until the run ends."""
    cfg, dist_info = params.train, Ranks.from_env()
    device = setup_process(cfg, dist_info)
    amp_dtype, precision = set_precision(cfg.precision, device)
    graphs, why = graph_plan(cfg, device, precision)
    if why and dist_info.is_main:
        print(f"train.cuda_graphs: {why}{'' if graphs else '; the eager step runs'}", file=sys.stderr)
    dataset = open_dataset(params, cfg.batch_size * dist_info.world_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = UNet(params.model.unet_config(params.data.image_size)).to(device, memory_format=memory_format)
    # device: its step counter n_averaged on the device too (a CUDA graph replays its increment)
    ema = AveragedModel(model, device, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    capturable = graphs and device.type == "cuda"  # Adam's step count on the device, no host read
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), capturable=capturable)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    fingerprint = training_fingerprint(params, dataset.manifest["sha256"], dist_info.world_size)
    checkpoints, state = open_checkpoints(params, fingerprint, dist_info, locks)
    if state is not None:
        restore(state, model, ema, optimizer, scaler)

    network: torch.nn.Module = model
    if dist_info.distributed and not graphs:  # DDP all-reduces the gradients during the backward pass
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    alphas_cumprod = on_device(params.diffusion.alphas_cumprod(), device)
    losses = functools.partial(
        _forward_losses,
        network,
        alphas_cumprod.float(),
        lambda_reg=cfg.lambda_reg,
        complexity_mode=cfg.complexity_mode,
        amp_dtype=amp_dtype,
        cache=not graphs,  # a captured graph cannot keep autocast's cache of cast weights
    )
    on_device_data = cfg.data_on_device is True or (cfg.data_on_device == "auto" and DeviceImages.fits(dataset, device))
    return Trainer(
        params=params,
        dist=dist_info,
        device=device,
        precision=precision,
        amp_dtype=amp_dtype,
        graphs=graphs,
        dataset=dataset,
        images=DeviceImages(dataset, device) if on_device_data else None,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scaler=scaler,
        losses=torch.compile(losses) if cfg.compile else losses,
        alphas_cumprod=alphas_cumprod,
        fingerprint=fingerprint,
        start_step=int(state["step"]) if state is not None else 0,
        checkpoints=checkpoints,
    )


def restore(
    state: dict[str, Any],
    model: UNet,
    ema: AveragedModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load a checkpoint's weights, EMA, Adam state (fitted to this run's capturable setting) and scaler."""
    capturable = bool(optimizer.param_groups[0]["capturable"])
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    fit_optimizer(optimizer, capturable)
    scaler.load_state_dict(state["scaler"])


def fit_optimizer(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Fit Adam's loaded state to this run: a checkpoint of a graphed run (step counts on the device, the
    learning rate a tensor) resumes eagerly, and an eager one resumes graphed."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        group["lr"] = float(group["lr"])
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device if capturable else "cpu", torch.float32)


# ---------------------------------------------------------------------------------------------------------
# 2. The data, and one optimization step
# ---------------------------------------------------------------------------------------------------------


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


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which checkpoints before they are shut down.

    Ctrl-C and process-group kills (DVC, Prefect, a shell) reach every process of the group; a worker that
    died first would take the batch it was loading with it, and the main process would fail before its
    checkpoint.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def epoch_order(trainer: Trainer, epoch: int, skip: int) -> SkipSampler:
    """This rank's indices of ``epoch`` after its first ``skip``: a function of (train.seed, epoch)."""
    d = trainer.dist
    sampler = DistributedSampler(
        trainer.dataset, d.world_size, d.rank, shuffle=True, seed=trainer.cfg.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return SkipSampler(sampler, skip)


def batches(trainer: Trainer, end: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(step, x0)`` for the steps ``trainer.start_step .. end - 1``: from a DataLoader, or gathered in device
    memory when the dataset is there (``trainer.images``; the same batches in the same order).

    Epoch e's order is a function of (train.seed, e) and a resumed run skips into its epoch, so it reads
    exactly the batches an uninterrupted run reads.
    """
    cfg = trainer.cfg
    steps_per_epoch = len(trainer.dataset) // trainer.global_batch
    step = trainer.start_step
    while step < end:
        epoch, offset = divmod(step, steps_per_epoch)
        order = epoch_order(trainer, epoch, offset * cfg.batch_size)
        for x0 in _epoch_batches(trainer, order):
            yield step, x0
            step += 1
            if step >= end:
                return


def _epoch_batches(trainer: Trainer, order: SkipSampler) -> Iterator[torch.Tensor]:
    """The full batches of one epoch's ``order``."""
    cfg = trainer.cfg
    if trainer.images is not None:
        indices = torch.tensor(list(order), dtype=torch.long).to(trainer.device, non_blocking=True)
        full = len(indices) // cfg.batch_size
        yield from (trainer.images.batch(b) for b in indices[: full * cfg.batch_size].split(cfg.batch_size))
        return
    yield from DataLoader(
        trainer.dataset,
        batch_size=cfg.batch_size,
        sampler=order,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=trainer.device.type == "cuda",
        worker_init_fn=_ignore_stop_signals,
    )


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up from ~0 to ``base_lr`` over ``warmup`` steps, then constant (DDPM)."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module, decay: float, first: bool) -> None:
    """``ema.update_parameters(model)`` for an ``AveragedModel(model, get_ema_multi_avg_fn(decay),
    use_buffers=True)``, computed the same way (a copy at the first update, then ``lerp`` by 1 - decay), minus
    its two reads of ``n_averaged`` from the device per call: host syncs that leave a GPU idle every step.
    ``first``: the run's first update (``n_averaged`` is 0 exactly when the step is 0)."""
    averaged = [t.detach() for t in (*ema.module.parameters(), *ema.module.buffers())]
    current = [t.detach() for t in (*model.parameters(), *model.buffers())]
    if first:
        torch._foreach_copy_(averaged, current)
    else:
        torch._foreach_lerp_(averaged, current, 1 - decay)
    ema.n_averaged += 1


def draw(trainer: Trainer, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's random draws, in this order: the flips (applied to ``x0``), the timesteps, the noise."""
    if trainer.cfg.random_flip:
        flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(0, trainer.params.diffusion.num_train_steps, (x0.shape[0],), device=x0.device)
    return x0, t, torch.randn_like(x0)


def train_step(trainer: Trainer, x0: torch.Tensor, step: int) -> torch.Tensor:
    """One optimization step on the batch ``x0`` (uint8-scaled floats in [-1, 1], as the dataset yields).

    Returns ``[loss, mse, complexity_term, grad_norm]`` on the device: reading them would wait for the GPU, so
    the caller does that only at log steps.
    """
    cfg = trainer.cfg
    torch.manual_seed(derive_seed(cfg.seed, trainer.dist.rank, step))  # this step's flips, t, noise and dropout
    x0 = x0.to(trainer.device, non_blocking=True).contiguous(memory_format=trainer.memory_format)
    losses = trainer.losses(*draw(trainer, x0))
    loss = losses["loss"].mean()

    set_lr(trainer.optimizer, lr_at(step, cfg.lr, cfg.warmup))
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(loss).backward()
    trainer.scaler.unscale_(trainer.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.grad_clip)
    trainer.scaler.step(trainer.optimizer)  # under fp16, skipped when the gradients overflowed
    trainer.scaler.update()
    update_ema(trainer.ema, trainer.model, cfg.ema_decay, first=step == 0)
    return torch.stack([loss, losses["mse"].mean(), losses["complexity_term"].mean(), grad_norm]).detach()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: in place where it is a device tensor (a captured graph reads it there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class GraphedStep:
    """:func:`train_step` captured as a CUDA graph and replayed (``train.cuda_graphs``): the same arithmetic on
    static tensors, launched as one unit instead of ~2,000 kernels.

    Before each replay the batch is copied into ``self.x0``, the learning rate filled into the optimizer's
    device tensor and the step's seed set: the generator's graph-safe state gives the replay the flips,
    timesteps, noise and dropout of seed (train.seed, rank, step), as in the eager step, so a resumed run
    takes the steps of one that ran through. Adam is ``capturable`` (its step count on the device), the EMA
    update reads nothing back, and the stats stay on the device. Step 0 (the EMA's first update is a copy)
    runs eagerly, as do the warm-up calls before the capture: both are real steps. Under DDP the model is not
    wrapped: the gradients are averaged between two graphs by one all-reduce of a flat buffer, DDP's own
    arithmetic (divide by the world size, then sum). Off CUDA the work runs uncaptured (``cuda_graphs: true``
    on the CPU), which is how the tests hold it to the eager step, bit for bit; on CUDA the one difference is
    Adam's capturable form (step count and learning rate as float32 device tensors), which can round the
    update's last bit differently from the eager form.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, cfg, device = trainer, trainer.cfg, trainer.device
        size = trainer.params.data.image_size
        self.x0 = torch.zeros(cfg.batch_size, 3, size, size, device=device).contiguous(
            memory_format=trainer.memory_format
        )
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        if device.type == "cuda":  # a tensor that a captured graph reads in place
            for group in trainer.optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.flat: torch.Tensor | None = None
        if trainer.dist.distributed:
            self.flat = torch.zeros(sum(p.numel() for p in self.params), device=device)
            pieces = self.flat.split([p.numel() for p in self.params])
            self.views = [v.view_as(p) for v, p in zip(pieces, self.params, strict=True)]
            self.forward_backward = Graphed(self._forward_backward, device)
            self.update = Graphed(lambda: self._update(first=False), device)
        else:
            self.whole = Graphed(lambda: torch.cat([self._forward_backward(), self._update(first=False)]), device)

    def __call__(self, x0: torch.Tensor, step: int) -> torch.Tensor:
        """Step ``step`` on the batch ``x0``; returns ``[loss, mse, complexity_term, grad_norm]`` on the device."""
        trainer, cfg = self.trainer, self.trainer.cfg
        torch.manual_seed(derive_seed(cfg.seed, trainer.dist.rank, step))
        self.x0.copy_(x0, non_blocking=True)
        set_lr(trainer.optimizer, lr_at(step, cfg.lr, cfg.warmup))
        first = step == 0
        if self.flat is None:
            return torch.cat([self._forward_backward(), self._update(first=True)]) if first else self.whole()
        losses = self._forward_backward() if first else self.forward_backward()
        dist.all_reduce(self.flat)
        return torch.cat([losses, self._update(first=True) if first else self.update()])

    def _forward_backward(self) -> torch.Tensor:
        """The eager step's flips, forward pass, loss and backward pass; ``[loss, mse, complexity_term]``."""
        trainer = self.trainer
        losses = trainer.losses(*draw(trainer, self.x0))  # the bare model: build_trainer wraps no DDP for graphs
        loss = losses["loss"].mean()
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.flat is not None:  # this rank's share of the average, for the all-reduce
            torch._foreach_copy_(self.views, [p.grad for p in self.params])
            self.flat.div_(trainer.dist.world_size)
        return torch.stack([loss, losses["mse"].mean(), losses["complexity_term"].mean()]).detach()

    def _update(self, first: bool) -> torch.Tensor:
        """Gradient clipping, Adam and the EMA; ``[grad_norm]``."""
        trainer, cfg = self.trainer, self.trainer.cfg
        if self.flat is not None:  # the all-reduced average back into the gradients
            torch._foreach_copy_([p.grad for p in self.params], self.views)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.grad_clip)
        trainer.optimizer.step()
        update_ema(trainer.ema, trainer.model, cfg.ema_decay, first=first)
        return grad_norm.detach()[None]


def make_step(trainer: Trainer) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The run's step function: :class:`GraphedStep` where ``trainer.graphs``, else :func:`train_step`."""
    return GraphedStep(trainer) if trainer.graphs else functools.partial(train_step, trainer)


# ---------------------------------------------------------------------------------------------------------
# 3. Periodic maintenance
# ---------------------------------------------------------------------------------------------------------


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
    """``train_metrics.csv`` (or, with ``fields``, another curve of the run), appended one row per log step; rows
    past a resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int, fields: list[str] = METRICS_FIELDS) -> None:
        self.fields = fields
        rows = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.file = open(path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        self.writer = csv.DictWriter(self.file, fields)

    def write(self, row: dict[str, float]) -> None:
        self.writer.writerow({k: row[k] for k in self.fields})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TrainingFID:
    """FID while training (``train.fid_every``): at those steps the EMA model draws ``train.fid_samples`` images as
    the sample section says (every rank its share by index, the statistics merged: the FID of one process) and
    they are scored against the reference statistics (``ddim reference``'s file).

    The best score's checkpoint is the recipe's ``best.json`` (:func:`tasks.common.checkpoint.read_best`), which
    pruning never deletes, also in later runs with the FID off. Scores are compared only when measured the same
    way (image count, sampler settings, reference file): another way starts a new best, and the old one becomes
    an ordinary checkpoint."""

    def __init__(self, trainer: Trainer) -> None:
        params, cfg = trainer.params, trainer.cfg
        self.every, self.inception = cfg.fid_every, None
        self.sampling = params.sample.model_copy(update={"num_samples": cfg.fid_samples})
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self.measured_with: dict[str, Any] = {}
        if self.every:  # a missing reference or Inception fails now, before the first step
            path = reference_path(params)
            self.reference = load_stats(path)[:2]
            self.inception = load_inception(trainer.device)
            settings = self.sampling.own_settings()
            self.measured_with = {"num_samples": cfg.fid_samples, **settings, "reference_sha256": file_hash(path)}
        if trainer.start_step == 0 and trainer.dist.is_main:  # no checkpoint of the recipe left: nor a best of it
            (trainer.checkpoints / BEST_FILE).unlink(missing_ok=True)
        self.best = read_best(trainer.checkpoints)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    @property
    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    def measure(self, trainer: Trainer) -> float | None:
        """The EMA model's FID now (every rank draws its share; the score on rank 0, None on the others, and on rank
        0 too, with a warning, when the statistics give no FID: training goes on)."""
        amp_dtype = autocast_dtype(trainer.params.sample.precision, trainer.device)
        ema = trainer.ema.module
        ema.eval()
        try:
            net = InferenceModel(ema, trainer.alphas_cumprod, trainer.device, amp_dtype, "")
            with torch.no_grad():
                stats, _ = draw_features(net, self.sampling, trainer.dist, self.inception)
            stats.reduce()
        finally:
            ema.train()
        if not trainer.dist.is_main:
            return None
        assert self.reference is not None
        try:
            return frechet_distance(*stats.mean_and_covariance(), *self.reference)
        except EvaluationError as e:  # degenerate statistics (too few images, an early model): no score this time
            warnings.warn(f"no FID while training this time: {e}", stacklevel=2)
            return None

    def is_best(self, fid: float) -> bool:
        """Whether ``fid`` beats the recipe's best (one measured another way does not count)."""
        best = self.best
        return best is None or best.get("measured_with") != self.measured_with or fid < best["train_fid"]

    def keep(self, folder: Path, step: int, fid: float) -> None:
        """Make step ``step``'s checkpoint (written) the recipe's best."""
        self.best = {"step": step, "train_fid": fid, "measured_with": self.measured_with}
        write_best(folder, self.best)


def sample_grid(trainer: Trainer) -> np.ndarray:
    """16 EMA samples (DDIM, eta 0, x0 clipped, fixed noise) as a uint8 grid image."""
    cfg, size, T = trainer.cfg, trainer.params.data.image_size, trainer.params.diffusion.num_train_steps
    x_T = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(cfg.seed)).to(trainer.device)
    timesteps = ddim_timesteps(T, min(cfg.sample_steps, T), "trailing")
    ema = trainer.ema.module
    was_training = ema.training
    ema.eval()
    x0 = ddim_sample(ema, x_T, trainer.alphas_cumprod, timesteps, eta=0.0, clip_x0=True)
    ema.train(was_training)
    return make_grid(to_uint8(x0), nrow=4)


class Bookkeeping:
    """Everything a run does besides stepping: running sums, the NaN check, metric rows, grids, checkpoints.

    Per step, :meth:`record` only adds on the device. :meth:`maintain` runs at log and checkpoint steps
    (and, in one process, as soon as a stop is asked for); there the ranks agree, in one all-reduce, on
    whether any of them saw a non-finite loss or gradient, so every rank stops at the same step and no
    checkpoint is ever written from weights that a bad step has reached.
    """

    def __init__(
        self, trainer: Trainer, end: int, progress: Callable[[int, int, dict[str, float]], None] | None
    ) -> None:
        self.trainer, self.end, self.progress = trainer, end, progress
        self.sums = torch.zeros(3, device=trainer.device)  # loss, mse, complexity term since the last log step
        self.grad_norm = torch.zeros((), device=trainer.device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=trainer.device)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.last: dict[str, float] = {"loss": float("nan")}
        self.tracker: NullTracker = NullTracker()
        self.csv: MetricsCSV | None = None
        self.fid, self.fid_csv = TrainingFID(trainer), None
        self.models: dict[int, ModelUpload | None] = {}  # the logged model of each step that has one
        self.scratch: Path | None = None  # model files waiting to be sent to MLflow
        self.system: SystemMetrics | None = None  # CPU/GPU utilisation and memory, sampled into the run
        self.bar = progress_bar(
            total=trainer.cfg.steps,
            initial=trainer.start_step,
            desc="train",
            unit="step",
            disable=not trainer.dist.is_main,
        )
        if trainer.dist.is_main:
            self._open_outputs()

    def _open_outputs(self) -> None:
        """The MLflow run (continued on resume), the metrics CSV and the run id file (main process only)."""
        params, trainer = self.trainer.params, self.trainer
        ckpt_dir, out_dir = trainer.checkpoints, Path(params.paths.train)
        if trainer.start_step == 0:  # no checkpoint of this recipe: a new MLflow run (other recipes' stay as they are)
            (ckpt_dir / "mlflow_run_id").unlink(missing_ok=True)
            (out_dir / RUN_FILE).unlink(missing_ok=True)  # the last run's record, until this one exports
        tags = {
            "mlflow.source.git.commit": git_commit(),
            "dataset.sha256": trainer.dataset.manifest["sha256"],
            "dataset.name": params.data.name,
            "stage": "train",
            "device": str(trainer.device),
            "precision": trainer.precision,
        }
        self.tracker = Tracker.for_training(
            params.tracking, params.model_dump(mode="json"), tags, ckpt_dir, run_name=training_run_name(params)
        )
        write_or_forget_run_id(self.tracker.run_id, out_dir)
        self.system = SystemMetrics.start(self.tracker, params.tracking.system_metrics, resume=trainer.start_step > 0)
        self.csv = MetricsCSV(out_dir / "train_metrics.csv", trainer.start_step)
        self.fid_csv = MetricsCSV(out_dir / FID_FILE, trainer.start_step, FID_FIELDS)  # header only without FID

    def record(self, step: int, stats: torch.Tensor) -> None:
        """Add step ``step``'s ``[loss, mse, complexity_term, grad_norm]`` (no host sync)."""
        loss_ok = torch.isfinite(stats[0])
        grad_ok = torch.isfinite(stats[3]) | self.trainer.scaler.is_enabled()  # fp16: the scaler skips such steps
        self.bad_step = torch.where(~(loss_ok & grad_ok) & (self.bad_step < 0), step, self.bad_step)
        self.sums += stats[:3]
        self.grad_norm = stats[3]
        self.window_steps += 1
        self.bar.update(1)

    def maintain(self, step: int, stop_asked: bool) -> None:
        """After ``step`` steps: log, check, FID, grid, checkpoint and logged model when due; raise if the run must
        stop."""
        cfg, trainer = self.trainer.cfg, self.trainer
        at_log = step % cfg.log_every == 0 or step == self.end
        at_fid = self.fid.due(step)
        at_checkpoint = step % cfg.checkpoint_every == 0 or step == self.end or at_fid  # a best is a checkpoint
        at_grid = bool(cfg.sample_every) and step % cfg.sample_every == 0 and step < cfg.steps  # the last: export
        at_model = bool(cfg.model_every) and step % cfg.model_every == 0 and step < cfg.steps  # the last: export
        if not (at_log or at_checkpoint or at_grid or at_model or (stop_asked and not trainer.dist.distributed)):
            return
        stop = self._agree(stop_asked)
        if at_log:
            self._log(step)
        fid = self._measure_fid(step) if at_fid else None
        if trainer.dist.is_main and at_grid:
            self.tracker.log_image(sample_grid(trainer), f"samples/step_{step:08d}.png")
        if at_checkpoint or stop:
            self._checkpoint(step, fid)
        if at_model or fid is not None:
            self.log_model(step, fid)
        if stop:
            raise TrainingInterruptedError(f"stopped at step {step}: checkpoint written, rerun to resume")

    def _agree(self, stop_asked: bool) -> bool:
        """All ranks learn whether any saw a bad step or a stop request; raise on a bad step."""
        flags = torch.stack([self.bad_step, torch.tensor(int(stop_asked), device=self.trainer.device)])
        if self.trainer.dist.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_step, stop = flags.tolist()
        if bad_step >= 0:
            raise TrainingError(
                f"the loss or gradient became NaN or inf at step {bad_step + 1}; the last good checkpoint in "
                f"{self.trainer.checkpoints} is kept: lower train.lr or use train.precision=fp32"
            )
        return bool(stop)

    def _log(self, step: int) -> None:
        trainer = self.trainer
        if trainer.dist.distributed:
            dist.all_reduce(self.sums)
            self.sums /= trainer.dist.world_size
        elapsed = time.perf_counter() - self.window_start
        loss, mse, cterm = (self.sums / self.window_steps).tolist()
        self.last = {
            "step": step,
            "loss": loss,
            "mse": mse,
            "complexity_term": cterm,
            "lr": lr_at(step - 1, trainer.cfg.lr, trainer.cfg.warmup),
            "grad_norm": float(self.grad_norm),
            "images_per_s": self.window_steps * trainer.global_batch / elapsed,
        }
        if self.csv is not None:
            self.csv.write(self.last)
        self.tracker.log_metrics({k: v for k, v in self.last.items() if k != "step"}, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{self.last['images_per_s']:.0f}")
        if self.progress is not None and trainer.dist.is_main:
            self.progress(step, trainer.cfg.steps, self.last)
        self.sums.zero_()
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _measure_fid(self, step: int) -> float | None:
        """The EMA model's FID at ``step`` (every rank takes part; rank 0 writes its row and gets the score)."""
        start = time.perf_counter()
        fid = self.fid.measure(self.trainer)
        seconds = time.perf_counter() - start
        self.window_start += seconds  # the images/s of training leave the FID's time out
        if fid is not None and self.fid_csv is not None:
            num = self.trainer.cfg.fid_samples
            self.fid_csv.write({"step": step, "fid": fid, "num_samples": num, "seconds": round(seconds, 2)})
            self.bar.set_postfix(fid=f"{fid:.2f}")
        return fid

    def log_model(self, step: int, fid: float | None = None, path: Path | None = None) -> None:
        """The EMA weights at ``step`` as an MLflow logged model, once per step (``path``: a model.pt of them, else
        a snapshot is written for it), and ``fid``, where measured there, as a metric linked to it."""
        trainer = self.trainer
        if not trainer.dist.is_main or self.tracker.run_id is None:
            return
        waiting = [u for u in self.models.values() if u is not None and u.temporary and "artifacts" not in u.done]
        if step not in self.models and path is None and waiting:  # MLflow is away: one snapshot waits, not many
            self.models[step] = None
        if step not in self.models:
            if path is None:
                self.scratch = self.scratch or Path(tempfile.mkdtemp(prefix="ddim-models-"))
                path = self.scratch / f"model-{step:08d}.pt"
                write_model(trainer, path, step)
            tags = {"dataset.name": trainer.params.data.name, "dataset.sha256": trainer.dataset.manifest["sha256"]}
            sampling = trainer.params.sample.model_dump(mode="json")
            upload = ModelUpload(self.tracker.run_id, path, step, sampling, tags, path.parent == self.scratch)
            self.tracker.send(f"model at step {step}", upload)
            self.models[step] = upload
        if fid is not None:
            self.tracker.log_metrics({"train_fid": fid}, step, model=self.models[step])

    def _checkpoint(self, step: int, fid: float | None = None) -> None:
        trainer = self.trainer
        if not trainer.dist.is_main:
            return
        state = {
            "model_config": trainer.model.config.to_dict(),
            "diffusion": trainer.params.diffusion.model_dump(),
            "fingerprint": trainer.fingerprint,
            "model": trainer.model.state_dict(),
            "ema": trainer.ema.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            # The random state of step s is re-derived from (seed, rank, s), so `step` is the RNG state.
            "rng": {"scheme": "torch.manual_seed(SeedSequence([seed, rank, step]))", "seed": trainer.cfg.seed},
            "params": trainer.params.model_dump(mode="json"),
            "mlflow_run_id": self.tracker.run_id,
        }
        keep = trainer.cfg.keep_checkpoints
        save_checkpoint(trainer.checkpoints, step, state, keep, protect=self.fid.best_step)
        if fid is not None and self.fid.is_best(fid):
            self.fid.keep(trainer.checkpoints, step, fid)
            prune_checkpoints(trainer.checkpoints, keep, protect=step)  # the best before this one may go now

    def close(self, status: str, finished: bool) -> None:
        self.bar.close()
        if self.system is not None:
            self.system.stop()
        for curve in (self.csv, self.fid_csv):
            if curve is not None:
                curve.close()
        timeout = self.trainer.params.tracking.flush_timeout
        if status == "KILLED":  # SIGTERM: the checkpoint is written, and the grace period may be short
            timeout = min(timeout, 5.0)
        if status != "FINISHED" or finished:
            self.tracker.finish(status, timeout=timeout)
        else:  # stopped early on purpose (stop_after): the run stays open, what it logged is sent
            self.tracker.flush(timeout)
        if self.scratch is not None:  # what MLflow did not take by now is not sent
            shutil.rmtree(self.scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# 4. The export, and the loop
# ---------------------------------------------------------------------------------------------------------


def training_run_name(params: Params) -> str:
    """The MLflow run's name: what tells training runs apart in the runs table (data, width, steps, loss)."""
    cfg = params.train
    return f"{params.data.name}-ch{params.model.ch}-{cfg.steps}steps-lambda{cfg.lambda_reg:g}-{cfg.complexity_mode}"


def write_model(trainer: Trainer, path: Path, step: int) -> None:
    """The EMA weights as a ``model.pt`` at ``path`` (bit-identical for the same weights and step)."""
    save_model(
        path,
        trainer.model.config,
        trainer.ema.module.state_dict(),
        diffusion=trainer.params.diffusion.model_dump(),
        step=step,
        dataset_sha256=trainer.dataset.manifest["sha256"],
        source={"kind": "train"},
    )


def best_checkpoint(trainer: Trainer, best: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recipe's checkpoint with the best training-time FID, as ``train_run.json`` names it (None: none)."""
    if best is None:
        return None
    path = checkpoint_path(trainer.checkpoints, best["step"])
    return {"path": str(path), "step": best["step"], "train_fid": best["train_fid"], **best["measured_with"]}


def export(trainer: Trainer, book: Bookkeeping) -> dict[str, Any]:
    """Write ``model.pt`` (bit-identical for the same weights) and the ``train_run.json`` sidecar; log the model."""
    params, out_dir = trainer.params, Path(trainer.params.paths.train)
    model_path = out_dir / MODEL_FILE
    write_model(trainer, model_path, trainer.cfg.steps)
    about = {
        "model": str(model_path),
        "model_sha256": file_hash(model_path),
        "weights_sha256": weights_digest(trainer.ema.module),
        "mlflow_run_id": book.tracker.run_id,
        "git_commit": git_commit(),
        "device": str(trainer.device),
        "precision": trainer.precision,
        "best_checkpoint": best_checkpoint(trainer, book.fid.best),
        "params": params.model_dump(mode="json"),
    }
    write_json(about, out_dir / RUN_FILE)
    write_final_metrics(out_dir)
    book.tracker.log_image(sample_grid(trainer), f"samples/step_{trainer.cfg.steps:08d}.png")
    book.tracker.log_artifact(model_path)
    book.log_model(trainer.cfg.steps, path=model_path)  # the final model, unless its step logged one already
    return {k: about[k] for k in ("model", "weights_sha256", "device", "precision", "best_checkpoint")}


def write_final_metrics(out_dir: Path) -> None:
    """``train_metrics.json``: the step, loss, MSE and complexity term of the metrics CSV's last row (a run that
    resumed at its end has logged nothing new, and its CSV still ends with that row); ``{}`` without rows."""
    with open(out_dir / "train_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1] if rows else {}
    final = {k: float(last[k]) for k in ("loss", "mse", "complexity_term") if k in last}
    write_json({"step": int(last["step"]), **final} if last else {}, out_dir / FINAL_FILE)


def check_ranks_in_sync(trainer: Trainer) -> None:
    digests: list[str | None] = [None] * trainer.dist.world_size
    dist.all_gather_object(digests, weights_digest(trainer.model))
    if len(set(digests)) != 1:
        raise TrainingError("ranks ended with different weights: the DDP job is inconsistent")


def import_pretrained(params: Params) -> dict[str, Any]:
    """The train stage's other mode, for ``model.pretrained``: released weights become ``model.pt``, tracked
    like a trained model. The params must describe the imported network, so that they say what model it is."""
    source, out_dir = params.model.pretrained, Path(params.paths.train)
    assert source is not None
    imported = read_source(source, Path(params.paths.raw) / "models", params.data.image_size, params.tracking)
    mine, theirs = params.model.unet_config(params.data.image_size).to_dict(), imported.config.to_dict()
    differ = [f"{k}={v} (params: {mine[k]})" for k, v in theirs.items() if k != "dropout" and v != mine[k]]
    if differ:
        raise TrainingError(f"{source} is another U-Net: {', '.join(differ)}; set model.* and data.image_size to match")
    if imported.diffusion != params.diffusion.model_dump():
        raise TrainingError(f"{source} was trained with diffusion {imported.diffusion}: set the diffusion params to it")
    imported.config = dataclasses.replace(imported.config, dropout=params.model.dropout)  # dropout: for fine-tuning
    model_path = out_dir / MODEL_FILE
    write_imported(imported, model_path)
    print(f"weights: {imported.source['weights']}", file=sys.stderr)  # which of DDPM's weights, in words

    # The import's MLflow run id: in a folder of its own (one per source file), apart from the training recipes.
    ckpt_dir = project_path(params.paths.checkpoints) / f".import-{imported.source['sha256'][:12]}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tags = {"stage": "train", "source": source, "source.sha256": imported.source["sha256"], "device": "cpu"}
    name = "import-" + source.rstrip("/").rsplit("/", 1)[-1]  # hub id, URL, folder or file: its last part
    tracker = Tracker.for_training(params.tracking, params.model_dump(mode="json"), tags, ckpt_dir, run_name=name)
    write_or_forget_run_id(tracker.run_id, out_dir)
    MetricsCSV(out_dir / "train_metrics.csv", 0).close()  # no training: an empty loss curve
    write_final_metrics(out_dir)
    about = {"model": str(model_path), "model_sha256": file_hash(model_path), "mlflow_run_id": tracker.run_id}
    write_json({**about, "source": imported.source, "params": params.model_dump(mode="json")}, out_dir / RUN_FILE)
    tracker.log_artifact(model_path)
    if tracker.run_id is not None:
        sampling = params.sample.model_dump(mode="json")
        tracker.send("the model", ModelUpload(tracker.run_id, model_path, 0, sampling, {"source": source}, False))
    tracker.finish("FINISHED", params.tracking.flush_timeout)
    return {**about, "imported_from": source}


def run(
    params: Params,
    *,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) training as configured; return a summary. ``stop_after`` ends early (tests)."""
    if params.model.pretrained:
        return import_pretrained(params)
    with contextlib.ExitStack() as locks:
        return _train(build_trainer(params, locks), stop_after, progress)


def _train(
    trainer: Trainer, stop_after: int | None, progress: Callable[[int, int, dict[str, float]], None] | None
) -> dict[str, Any]:
    params = trainer.params
    end = params.train.steps if stop_after is None else min(params.train.steps, stop_after)
    book = Bookkeeping(trainer, end, progress)
    done, status = trainer.start_step, "FAILED"
    trainer.model.train()
    trainer.ema.train()
    try:
        step_fn = make_step(trainer)
        with stop_on_signals() as stop_requested:
            for step, x0 in batches(trainer, end):
                book.record(step, step_fn(x0, step))
                done = step + 1
                book.maintain(done, stop_requested.is_set())
        summary: dict[str, Any] = {"step": done, "resumed_from": trainer.start_step, **book.last}
        summary["mlflow_run_id"] = book.tracker.run_id
        if trainer.dist.distributed:
            check_ranks_in_sync(trainer)
            summary["ranks_in_sync"] = True
        if trainer.dist.is_main and done >= params.train.steps:
            summary |= export(trainer, book)
        status = "FINISHED"
        return summary
    except TrainingInterruptedError:
        status = "KILLED"
        raise
    finally:
        book.close(status, finished=done >= params.train.steps)
        trainer.dist.finish()
