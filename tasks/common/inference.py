"""Running ``model.pt``'s EMA model for inference, shared by the sample, sweep, reconstruct and interpolate stages.

:func:`load_inference` is every stage's preamble (the model, its schedule, the precision); :func:`run_checked`
is the one place a model runs under autocast and its images are checked finite, and
:meth:`InferenceModel.in_batches` runs it over a tensor's items in batches.

Image i starts from the noise of a generator seeded from (``sample.seed``, i), drawn on the CPU, and takes its
step noise (``eta > 0``) from that generator too: it is the same image whatever the batch size, the device or
which process draws it (under ``torchrun``, ``tasks.common.distributed.Ranks.share`` splits the images by index).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.diffusion import adaptive_ddim_sample, ddim_sample, ddim_timesteps
from models.solvers import dpm_solver_sample, unipc_sample
from models.unet import UNet
from tasks.common.checkpoint import MODEL_FILE, ModelFileError, load_model
from tasks.common.config import Params, SampleConfig
from tasks.common.devices import on_device, set_precision
from tasks.common.errors import UserError
from tasks.common.seeds import derive_seed

Broken = Callable[[list[int]], Exception]  # the error for the items (indices) of a batch that came out non-finite


class SamplingError(UserError):
    """The sampler produced something that is not an image."""


def load_for_sampling(params: Params, device: torch.device) -> tuple[UNet, torch.Tensor]:
    """``model.pt``'s EMA model on ``device`` (compiled when ``sample.compile`` says so) and the schedule it
    was trained for (the params must agree)."""
    path = Path(params.paths.train) / MODEL_FILE
    model, state = load_model(path, device)
    if params.diffusion.model_dump() != state.get("diffusion"):
        raise ModelFileError(f"{path} was trained with diffusion={state.get('diffusion')}, params say otherwise")
    compile_ = params.sample.compile
    if compile_ is True or (compile_ == "auto" and device.type == "cuda"):
        model = torch.compile(model)  # the same module to every caller: attributes and weights pass through
    return model, on_device(params.diffusion.alphas_cumprod(), device)


def batches(indices: list[int], batch_size: int) -> Iterator[list[int]]:
    """``indices`` in consecutive chunks of ``batch_size`` (the last one shorter)."""
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def run_checked(
    fn: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    amp_dtype: torch.dtype | None,
    broken: Callable[[], Exception] | None,
) -> Any:
    """``fn(x)`` under autocast on ``x``'s device (in ``amp_dtype``; off when it is None), its images as float32.

    ``fn`` returns images, or a tuple whose first item is the images (the rest come back as they are). When
    ``broken`` is not None and an image holds NaN or infinity, ``broken()`` is raised: one read per call, so
    a blank image never passes for a result.
    """
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = fn(x)
    images, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
    if broken is not None and not torch.isfinite(images).all():
        raise broken()
    return images.float() if rest is None else (images.float(), *rest)


@dataclass(frozen=True)
class InferenceModel:
    """``model.pt``'s EMA model ready to run: on ``device``, with its schedule there, at the resolved precision
    (``amp_dtype`` for autocast, None for fp32; ``precision`` the name to record)."""

    model: UNet
    alphas_cumprod: torch.Tensor
    device: torch.device
    amp_dtype: torch.dtype | None
    precision: str

    def in_batches(
        self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, broken: Broken | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For each chunk of ``batch_size`` items of ``x`` (any device): the chunk on the model's device and
        ``fn`` of it (:func:`run_checked`: autocast, float32 and, unless ``broken`` is None, raising
        ``broken(indices)`` where an output is NaN or infinite)."""
        for indices in batches(list(range(len(x))), batch_size):
            batch = x[indices].to(self.device)
            check = None if broken is None else functools.partial(broken, indices)
            yield batch, run_checked(fn, batch, self.amp_dtype, check)

    def sample(self, cfg: SampleConfig, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` drawn as ``cfg`` says, and their model evaluations (:func:`sample_images`)."""
        return sample_images(self.model, self.alphas_cumprod, cfg, indices, self.amp_dtype)

    def map(
        self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, broken: Broken | None
    ) -> torch.Tensor:
        """``fn`` over ``x`` in batches (:meth:`in_batches`), the outputs concatenated."""
        return torch.cat([out for _, out in self.in_batches(fn, x, batch_size, broken)])


def load_inference(params: Params, device: torch.device) -> InferenceModel:
    """Every inference stage's preamble: ``model.pt``'s EMA model and schedule on ``device``
    (:func:`load_for_sampling`) at ``sample.precision`` (``set_precision``: it also sets the TF32 switches)."""
    model, alphas_cumprod = load_for_sampling(params, device)
    amp_dtype, precision = set_precision(params.sample.precision, device)
    return InferenceModel(model, alphas_cumprod, device, amp_dtype, precision)


def sample_images(
    model: UNet,
    alphas_cumprod: torch.Tensor,
    cfg: SampleConfig,
    indices: list[int],
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` as ``[B, 3, H, W]`` float in [-1, 1] and their model evaluations ``[B]`` (CPU)."""
    device, image_size = next(model.parameters()).device, model.config.image_size
    generators = [torch.Generator().manual_seed(derive_seed(cfg.seed, i)) for i in indices]
    x_T = torch.stack([torch.randn(3, image_size, image_size, generator=g) for g in generators]).to(device)

    def draw(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.sampler == "adaptive":
            args = (cfg.base_step_size, cfg.min_step, cfg.max_step, cfg.eta, cfg.clip_x0, cfg.complexity_mode)
            return adaptive_ddim_sample(model, x, alphas_cumprod, *args, generators)
        timesteps = ddim_timesteps(alphas_cumprod.shape[0], cfg.steps, cfg.spacing)
        if cfg.sampler == "ddim":
            x0 = ddim_sample(model, x, alphas_cumprod, timesteps, cfg.eta, cfg.clip_x0, generators)
        elif cfg.sampler == "dpm-solver++":
            x0 = dpm_solver_sample(model, x, alphas_cumprod, timesteps, cfg.order, clip_x0=cfg.clip_x0)
        else:
            x0 = unipc_sample(model, x, alphas_cumprod, timesteps, cfg.order, cfg.variant, clip_x0=cfg.clip_x0)
        return x0, torch.full((len(indices),), len(timesteps), dtype=torch.long)

    def broken() -> SamplingError:
        where = f"images {indices[0]}..{indices[-1]}"
        return SamplingError(f"{where} came out NaN or infinite: try sample.precision=fp32 or check model.pt")

    x0, nfe = run_checked(draw, x_T, amp_dtype, broken)
    return x0, nfe.cpu()
