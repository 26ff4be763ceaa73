"""Drawing images from an eps-model, shared by the sample and sweep stages, in one process or many.

Image i starts from the noise of a generator seeded from (``sample.seed``, i), drawn on the CPU, and takes its
step noise (``eta > 0``) from that generator too: it is the same image whatever the batch size, the device or
which process draws it (under ``torchrun``, ``tasks.distributed.Ranks.share`` splits the images by index).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from models.diffusion import adaptive_ddim_sample, ddim_sample, ddim_timesteps
from models.unet import UNet
from tasks.checkpoint import MODEL_FILE, ModelFileError, load_model
from tasks.config import Params, SampleConfig
from tasks.devices import on_device
from tasks.errors import UserError
from tasks.seeds import derive_seed


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
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


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
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if cfg.sampler == "ddim":
            timesteps = ddim_timesteps(alphas_cumprod.shape[0], cfg.steps, cfg.spacing)
            x0 = ddim_sample(model, x_T, alphas_cumprod, timesteps, cfg.eta, cfg.clip_x0, generators)
            nfe = torch.full((len(indices),), len(timesteps), dtype=torch.long)
        else:
            x0, nfe = adaptive_ddim_sample(
                model,
                x_T,
                alphas_cumprod,
                cfg.base_step_size,
                cfg.min_step,
                cfg.max_step,
                cfg.eta,
                cfg.clip_x0,
                cfg.complexity_mode,
                generators,
            )
    if not torch.isfinite(x0).all():  # one read per batch; a blank image must never pass for a sample
        raise SamplingError(
            f"images {indices[0]}..{indices[-1]} came out NaN or infinite: try sample.precision=fp32 or check model.pt"
        )
    return x0.float(), nfe.cpu()
