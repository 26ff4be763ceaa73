"""The interpolate stage: DDIM's section 5.3. The eta = 0 sampler is a deterministic map from x_T to an image,
so walking between two latents walks between two images. For each of ``latent.pairs`` pairs of latents
(Gaussian draws seeded by (``latent.seed``, 2k) and (``latent.seed``, 2k + 1), or the dataset's first images
encoded with DDIM), ``latent.frames`` points along the spherical path (slerp, the paper's choice) and along the
straight line (lerp, for comparison) are decoded with DDIM.

Output in ``paths.latent``: ``interpolation.png`` (per pair, a slerp row then a lerp row) and
``interpolation.json`` (what each row is, and the norm of each latent along it: the straight line's middle
latents are shorter than any Gaussian draw, which is why their images go flat); an MLflow child run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.diffusion import ddim_encode, ddim_sample, ddim_timesteps, lerp, slerp
from tasks.common.config import Params
from tasks.common.dataset import first_images
from tasks.common.devices import pick_device
from tasks.common.errors import UserError
from tasks.common.files import write_json
from tasks.common.images import from_uint8, make_grid, save_png, to_uint8
from tasks.common.inference import load_inference
from tasks.common.seeds import derive_seed
from tasks.common.tracking import log_child_run, read_run_id

PATHS = {"slerp": slerp, "lerp": lerp}


class InterpolationError(UserError):
    """The interpolation cannot be made."""


def endpoints(params: Params, encode: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs' two ends, ``[pairs, 3, H, W]`` each: seeded Gaussian latents, or encoded dataset images."""
    cfg, size = params.latent, params.data.image_size
    if cfg.endpoints == "seeds":
        generators = [torch.Generator().manual_seed(derive_seed(cfg.seed, i)) for i in range(2 * cfg.pairs)]
        z = torch.stack([torch.randn(3, size, size, generator=g) for g in generators]).to(device)
    else:
        root = Path(params.paths.prepared) / (cfg.dataset or params.data.name)
        images, _ = first_images(root, 2 * cfg.pairs, size)
        z = encode(from_uint8(images).to(device))
    return z[0::2], z[1::2]


def run(params: Params) -> dict[str, Any]:
    """Decode slerp and lerp paths between the pairs' latents into one grid; write it and its record."""
    cfg = params.latent
    net = load_inference(params, pick_device(params.sample.device))
    device, precision = net.device, net.precision
    timesteps = ddim_timesteps(params.diffusion.num_train_steps, cfg.interpolate_steps, cfg.spacing)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return net.map(lambda b: ddim_encode(net.model, b, net.alphas_cumprod, timesteps), x, cfg.batch_size, None)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return ddim_sample(net.model, z, net.alphas_cumprod, timesteps, 0.0, cfg.clip_x0)

    def broken(indices: list[int]) -> InterpolationError:
        return InterpolationError("the decoded images came out NaN or infinite: try sample.precision=fp32")

    z_0, z_1 = endpoints(params, encode, device)
    weights = np.linspace(0.0, 1.0, cfg.frames)
    rows = [(k, kind) for k in range(cfg.pairs) for kind in PATHS]
    latents = torch.cat([PATHS[kind](z_0[k : k + 1], z_1[k : k + 1], t) for k, kind in rows for t in weights])
    decoded = net.map(decode, latents, cfg.batch_size, broken)
    out = Path(params.paths.latent)
    save_png(make_grid(to_uint8(decoded), nrow=cfg.frames), out / "interpolation.png")
    norms = latents.flatten(1).norm(dim=1).view(len(rows), cfg.frames) / np.sqrt(latents[0].numel())
    record = {
        "rows": [f"pair {k}: {kind}" for k, kind in rows],
        "weights": weights.round(4).tolist(),
        "latent_norm_per_sqrt_dim": [[round(v, 4) for v in row] for row in norms.tolist()],
        "endpoints": cfg.endpoints,
        "steps": cfg.interpolate_steps,
        "device": str(device),
        "precision": precision,
    }
    write_json(record, out / "interpolation.json")
    middle = norms[:, cfg.frames // 2]
    run_id = log_child_run(
        params.tracking,
        read_run_id(Path(params.paths.train)),
        f"interpolate-{cfg.endpoints}-{cfg.interpolate_steps}steps",
        {"latent": cfg.model_dump(mode="json", include=set(cfg.result_keys()))},
        {"middle_norm_slerp": float(middle[0::2].mean()), "middle_norm_lerp": float(middle[1::2].mean())},
        [out / "interpolation.png"],
        {"stage": "interpolate", "device": str(device), "precision": precision},
    )
    return {"grid": str(out / "interpolation.png"), "rows": record["rows"], "run": run_id}
