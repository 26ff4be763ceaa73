"""Diffusion math: noise schedules, forward noising, DDIM and adaptive-step sampling, complexity, losses.

Notation follows the DDIM paper (Song et al. 2021):

- ``alphas_cumprod[t]`` is the paper's alpha_t, the cumulative product of ``1 - beta`` (DDPM's alpha-bar);
- ``x_t = sqrt(alpha_t) * x_0 + sqrt(1 - alpha_t) * eps``                                     (DDIM eq. 4);
- an *eps-model* is any callable ``eps_model(x_t, t) -> eps`` with ``t`` a LongTensor of shape ``[B]``: one
  timestep per sample, so samples in a batch may sit at different timesteps.

Every function here is a pure function of tensors. Randomness is passed in (``noise=``, ``generator=``), so
a result is reproducible from its inputs. Schedules are computed in float64 and cast where they are used.

Where the design document (``ddim-complexity-design.md``) is wrong, this module implements the paper and the
docstring says so; see ``docs/math.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

BetaSchedule = Literal["linear", "cosine"]
Spacing = Literal["uniform", "quad", "linspace", "trailing"]
ComplexityMode = Literal["design", "scaled"]
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: One generator for the whole batch, or one per sample (then sample i's noise never depends on the batch).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _check_choice(name: str, value: str, allowed_type: object) -> None:
    allowed = get_args(allowed_type)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------------
# Schedules and the forward process
# ----------------------------------------------------------------------------------------------------


def make_beta_schedule(
    kind: BetaSchedule, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Noise variances beta_1..beta_T as a float64 tensor of shape ``[num_steps]``.

    - ``"linear"``: DDPM's ``linspace(beta_start, beta_end, T)``.
    - ``"cosine"``: Nichol & Dhariwal (2021) eq. 17, ``alpha_t = f(t) / f(0)`` with
      ``f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2``, ``s = 0.008``, betas clipped at 0.999.
      ``beta_start`` / ``beta_end`` do not apply.
    """
    _check_choice("beta schedule", kind, BetaSchedule)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    s = 0.008
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """The paper's alpha_t: ``cumprod(1 - beta)``, in the dtype of ``betas`` (float64 from the schedules)."""
    return torch.cumprod(1.0 - betas, dim=0)


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` reshaped to ``[B, 1, ..., 1]`` to broadcast against ``like``, in its dtype and device.

    The lookup happens where ``values`` live and the cast before the move, so a float64 schedule on the CPU
    meets data on a device without float64 (Apple's MPS) only as ``like``'s dtype.
    """
    out = values[t.to(values.device)].to(like.dtype)
    return out.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0): ``sqrt(alpha_t) * x0 + sqrt(1 - alpha_t) * noise`` (DDIM eq. 4).

    Shapes: ``x0``, ``noise`` ``[B, ...]``; ``t`` LongTensor ``[B]``.
    """
    a = _gather(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def randn(shape: Sequence[int], generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device and dtype.

    With a sequence of generators (one per sample, ``len == shape[0]``), row i is drawn from generator i
    alone, so it does not depend on how samples are batched.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
    if isinstance(generator, torch.Generator):
        # Drawn where the generator lives, so a CPU generator gives the same numbers whatever `like`'s device.
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(like)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.stack(rows).to(like)


def _select(generator: Generators, mask: torch.Tensor) -> Generators:
    """The generators of the samples where ``mask`` is true (a shared generator stays shared)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [g for g, keep in zip(generator, mask.tolist(), strict=True) if keep]


# ----------------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------------


def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: Spacing = "uniform") -> torch.Tensor:
    """The S timesteps tau_S > ... > tau_1 that a DDIM sampler visits, descending, as a LongTensor.

    - ``"uniform"``: ``k * (T // S)`` for ``k = 0..S-1``, the DDIM repository's ``range(0, T, T // S)``
      truncated to S entries when ``S`` does not divide ``T`` (diffusers' ``"leading"``). Starts below
      ``T - 1`` (900 for T=1000, S=10).
    - ``"quad"``: the DDIM paper's quadratic spacing (used for its CIFAR-10 table):
      ``int(linspace(0, sqrt(0.8 T), S) ** 2)``. For large S the small values repeat (S=100 gives 0 four
      times); a repeated timestep is an exact identity step (alpha_t = alpha_prev, so sigma = 0 and
      x_prev = x_t) that still costs a model call, so repeats are dropped and fewer than S may come back.
    - ``"linspace"``: S steps evenly spaced from ``T - 1`` down to 0, rounded (diffusers' ``"linspace"``):
      T=1000, S=10 gives 999, 888, ..., 111, 0. For S = 1 it is ``[T - 1]`` (diffusers gives ``[0]``).
    - ``"trailing"``: Lin et al. (2024), ``round(T - k T / S) - 1`` for ``k = 0..S-1`` (diffusers'
      ``"trailing"``): T=1000, S=10 gives 999, 899, ..., 99. It starts at the noisiest timestep and does not
      end at 0.

    Samplers take one more step after the last timestep, to alpha_prev = 1: the clean image.
    """
    _check_choice("spacing", spacing, Spacing)
    T, S = num_train_steps, num_steps
    if not 1 <= S <= T:
        raise ValueError(f"num_steps must be in [1, num_train_steps={T}], got {S}")
    if spacing == "uniform":
        seq = np.arange(S) * (T // S)
    elif spacing == "quad":
        seq = np.unique((np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64))
    elif spacing == "trailing":
        seq = (np.round(T - np.arange(S) * (T / S)).astype(np.int64) - 1)[::-1]
    elif S == 1:
        seq = np.array([T - 1])
    else:
        seq = np.round(np.linspace(0, T - 1, S)).astype(np.int64)
    return torch.from_numpy(seq[::-1].copy()).long()


def coefficient(alpha: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alpha`` in ``like``'s dtype: a number becomes a 0-dim CPU tensor, which a GPU kernel takes as a scalar
    argument (a tensor made on the GPU from a number is a blocking copy: one wait per use); a tensor of
    per-sample values goes to ``like``'s device."""
    if isinstance(alpha, torch.Tensor):
        return alpha.to(dtype=like.dtype, device=like.device if alpha.dim() else alpha.device)
    return torch.tensor(alpha, dtype=like.dtype)


def predict_x0(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float | torch.Tensor, clip_x0: bool = False
) -> torch.Tensor:
    """``x0_pred = (x_t - sqrt(1 - alpha_t) * eps) / sqrt(alpha_t)`` (DDIM eq. 9), optionally clamped.

    The design document's x0 formula is garbled; this is the paper's.
    """
    a = coefficient(alpha_t, x_t)
    x0_pred = (x_t - (1 - a).sqrt() * eps.to(x_t.dtype)) / a.sqrt()
    return x0_pred.clamp(-1.0, 1.0) if clip_x0 else x0_pred


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: float | torch.Tensor,
    alpha_prev: float | torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from x_{tau_i} to x_{tau_{i-1}} (DDIM eq. 12 with sigma from eq. 16).

    With ``a = alpha_t`` and ``a' = alpha_prev`` (scalars, or tensors broadcastable to ``x_t`` such as
    ``[B, 1, 1, 1]`` for per-sample timesteps):

    - ``x0_pred = (x_t - sqrt(1 - a) * eps) / sqrt(a)`` (:func:`predict_x0`).
    - ``sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))``  (the design's noise term)
    - ``coeff = sqrt(1 - a' - sigma**2)``, ``mean = sqrt(a') * x0_pred + coeff * eps``
    - ``x_prev = mean + sigma * noise``.

    ``clip_x0`` clamps ``x0_pred`` to [-1, 1] and then re-derives ``eps`` from the clipped prediction, so
    the "direction pointing to x_t" stays consistent with it (as diffusers does).

    ``noise`` (same shape as ``x_t``) is required whenever ``eta > 0``; it is passed in so a step is
    reproducible. ``eps`` may be in a lower precision (autocast); the step is computed in ``x_t``'s dtype.

    Returns ``(x_prev, x0_pred)``.
    """
    eps = eps.to(x_t.dtype)
    a, a_prev = coefficient(alpha_t, x_t), coefficient(alpha_prev, x_t)
    x0_pred = predict_x0(x_t, eps, a, clip_x0)
    if clip_x0:
        eps = (x_t - a.sqrt() * x0_pred) / (1 - a).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
    coeff = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
    x_prev = a_prev.sqrt() * x0_pred + coeff * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step needs `noise` when eta > 0: pass torch.randn_like(x_t) or a seeded draw")
        x_prev = x_prev + sigma * noise.to(x_t.dtype)
    return x_prev, x0_pred


@torch.no_grad()
def ddim_sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    eta: float = 0.0,
    clip_x0: bool = False,
    generator: Generators = None,
) -> torch.Tensor:
    """Run DDIM from ``x_T`` through the descending ``timesteps`` and return x_0.

    The step after the last timestep uses ``alpha_prev = 1``, so the result is the last x0 prediction.
    ``eta = 0`` is the deterministic DDIM (an ODE solver); ``eta = 1`` is DDPM-like ancestral sampling.
    Noise for ``eta > 0`` comes from ``generator`` (one, or one per sample; see :func:`randn`).
    """
    x = x_T
    ts = timesteps.tolist()
    alphas = [*alphas_cumprod[timesteps.to(alphas_cumprod.device)].tolist(), 1.0]  # one read, not two per step
    for i, t in enumerate(ts):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_model(x, t_batch)
        noise = randn(x.shape, generator, x) if eta > 0 else None
        x, _ = ddim_step(x, eps, alphas[i], alphas[i + 1], eta, noise, clip_x0)
    return x


@torch.no_grad()
def ddim_encode(
    eps_model: EpsModel, x_0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Run the eta = 0 DDIM ODE forwards in time: map data ``x_0`` to the latent at ``timesteps[0]``.

    The inverse of ``ddim_sample(..., eta=0)`` over the same ``timesteps`` (descending), up to the ODE's
    discretisation error, which vanishes as the steps get finer. Useful for inversion and interpolation.
    """
    x = x_0
    ascending = timesteps.flip(0).tolist()
    alphas = alphas_cumprod[timesteps.flip(0).to(alphas_cumprod.device)].tolist()  # one read of the schedule
    alpha = 1.0
    for i, t in enumerate(ascending):
        # eps is evaluated at the lower-noise end of each step (the reverse of the sampler's choice).
        t_eval = ascending[i - 1] if i > 0 else t
        t_batch = torch.full((x.shape[0],), t_eval, dtype=torch.long, device=x.device)
        eps = eps_model(x, t_batch)
        x, _ = ddim_step(x, eps, alpha, alphas[i], eta=0.0)
        alpha = alphas[i]
    return x


def ddim_reconstruct(
    eps_model: EpsModel, x_0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, clip_x0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM's section 5.4: encode ``x_0`` to its latent x_T over ``timesteps`` and decode it back (eta = 0, the
    same timesteps). Returns ``(reconstruction, latent)``; they differ from ``x_0`` and the true latent only by
    the ODE's discretisation error (first order: it shrinks like 1 / steps)."""
    latent = ddim_encode(eps_model, x_0, alphas_cumprod, timesteps)
    return ddim_sample(eps_model, latent, alphas_cumprod, timesteps, 0.0, clip_x0), latent


def slerp(z_0: torch.Tensor, z_1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation of each sample's latent (all dims but the first), DDIM's section 5.3:
    ``sin((1 - t) theta) / sin(theta) z_0 + sin(t theta) / sin(theta) z_1``, theta the angle between them.

    Two independent Gaussian latents are nearly orthogonal and of norm ~sqrt(dims); every point of the arc
    keeps that norm, where the straight line's midpoint has ~0.71 of it (an atypical, blurry latent).
    Parallel latents (theta ~ 0) fall back to the straight line."""
    flat_0, flat_1 = z_0.flatten(1).double(), z_1.flatten(1).double()
    cos = (flat_0 * flat_1).sum(1) / (flat_0.norm(dim=1) * flat_1.norm(dim=1))
    theta = cos.clamp(-1.0, 1.0).arccos()[:, None]
    sin = theta.sin()
    straight = sin.abs() < 1e-6
    w_0 = torch.where(straight, 1.0 - t, ((1.0 - t) * theta).sin() / sin.where(~straight, 1.0))
    w_1 = torch.where(straight, t, (t * theta).sin() / sin.where(~straight, 1.0))
    return (w_0 * flat_0 + w_1 * flat_1).to(z_0.dtype).view_as(z_0)


def lerp(z_0: torch.Tensor, z_1: torch.Tensor, t: float) -> torch.Tensor:
    """The straight line between latents, for comparison with :func:`slerp`."""
    return (1.0 - t) * z_0 + t * z_1


# ----------------------------------------------------------------------------------------------------
# The design's complexity measure, adaptive step size and modified loss
# ----------------------------------------------------------------------------------------------------
#
# Two modes, because the design's code has properties that make it useless as written, yet it is the
# thing being reproduced:
#
# "design": the design document's code exactly. A 2x2 finite-difference kernel with padding 1 gives
#   (H+1) x (W+1) maps (the loss then interpolates them back); it only accepts 3 channels; and it divides by
#   the L2 norm of the *whole batch*, so the values sum-of-squares to 1 over B*3*(H+1)*(W+1) entries: about
#   1.5e-3 on average for a CIFAR-10 batch of 128. The loss term is then ~1000x smaller than the MSE, and
#   `base_step_size / complexity` always hits `max_step`. A sample's complexity also depends on its batch.
#
# "scaled": the same finite differences, but maps of the input's own H x W (zero gradient past the last
#   row/column), any channel count, and a per-image normalisation so that each image's mean complexity is 1
#   (a constant image, which has no gradient anywhere, stays 0). The loss term is then an L1 loss that puts
#   more weight on edges, on the same scale as the MSE, and a sample's value never depends on its batch.


def _finite_differences_design(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"complexity mode 'design' takes [B, 3, H, W] images (its kernel hard-codes 3 channels), got "
            f"{list(x.shape)}; use mode='scaled' for other channel counts"
        )
    kernel_x = x.new_tensor([[[[-1.0, 1.0], [0.0, 0.0]]]]).repeat(3, 1, 1, 1)
    kernel_y = x.new_tensor([[[[-1.0, 0.0], [1.0, 0.0]]]]).repeat(3, 1, 1, 1)
    grad_x = F.conv2d(x, kernel_x, padding=1, groups=3).abs()
    grad_y = F.conv2d(x, kernel_y, padding=1, groups=3).abs()
    return torch.sqrt(grad_x**2 + grad_y**2)


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(dx**2 + dy**2)`` per channel with forward differences, same shape as ``x`` ``[B, C, H, W]``.

    The difference past the last column (row) is taken as 0.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images of shape [B, C, H, W], got {list(x.shape)}")
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return torch.sqrt(dx**2 + dy**2)


def compute_complexity(x: torch.Tensor, mode: ComplexityMode, eps: float = 1e-8) -> torch.Tensor:
    """The design's gradient-based complexity map of images ``x`` ``[B, C, H, W]``.

    - ``"design"``: exactly the design's code: ``[B, 3, H+1, W+1]``, divided by the batch's L2 norm.
    - ``"scaled"``: ``[B, C, H, W]``, each image divided by its own mean (so its mean is 1).

    See the comment above this function for why both exist.
    """
    _check_choice("complexity mode", mode, ComplexityMode)
    if mode == "design":
        c = _finite_differences_design(x)
        return c / (torch.linalg.vector_norm(c) + eps)
    c = gradient_magnitude(x)
    return c / (c.mean(dim=(1, 2, 3), keepdim=True) + eps)


def complexity_score(x: torch.Tensor, mode: ComplexityMode) -> torch.Tensor:
    """One complexity number per image ``[B]``: what the adaptive sampler divides ``base_step_size`` by.

    - ``"design"``: the mean of the design's complexity map over each image (so it depends on the batch,
      and is tiny; see above).
    - ``"scaled"``: the image's mean gradient magnitude (in data units per pixel, data in [-1, 1]); the
      ``"scaled"`` map is normalised by exactly this number, so the map always has mean 1 and this score
      carries the absolute level of detail. Flat images score 0, busy ones up to about 1.
    """
    _check_choice("complexity mode", mode, ComplexityMode)
    if mode == "design":
        return compute_complexity(x, "design").mean(dim=(1, 2, 3))
    return gradient_magnitude(x).mean(dim=(1, 2, 3))


def adaptive_step_size(
    complexity: torch.Tensor, base_step_size: float, min_step: float, max_step: float
) -> torch.Tensor:
    """The design's step size ``clamp(base_step_size / complexity, min_step, max_step)``, elementwise.

    Zero complexity gives ``max_step``.
    """
    if not 0 < min_step <= max_step:
        raise ValueError(f"need 0 < min_step <= max_step, got min_step={min_step}, max_step={max_step}")
    return (base_step_size / complexity).clamp(min=min_step, max=max_step)


def loss_terms(
    pred_noise: torch.Tensor, true_noise: torch.Tensor, complexity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(squared_error, complexity_term)``, each ``[B]``.

    ``squared_error`` is the mean of ``(pred - true)**2`` over each sample; ``complexity_term`` the mean of
    ``complexity * |pred - true|``. A complexity map whose H x W differs from the prediction's (the design
    mode's (H+1) x (W+1)) is resized bilinearly first, as the design does.
    """
    if complexity.shape[-2:] != pred_noise.shape[-2:]:
        complexity = F.interpolate(complexity, size=pred_noise.shape[-2:], mode="bilinear", align_corners=False)
    diff = pred_noise - true_noise
    dims = tuple(range(1, diff.ndim))
    squared_error = diff.square().mean(dim=dims)
    complexity_term = (complexity * diff.abs()).mean(dim=dims)
    return squared_error, complexity_term


def training_losses(
    eps_model: EpsModel,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    lambda_reg: float = 0.1,
    complexity_mode: ComplexityMode = "scaled",
) -> dict[str, torch.Tensor]:
    """The training objective for one batch: DDPM's algorithm 1 with the design's loss, per sample.

    ``x_t = q_sample(x0, t, noise)``; ``eps_pred = eps_model(x_t, t)``; then, with the complexity map of the
    clean images ``c = compute_complexity(x0, complexity_mode)``,

    - ``mse[i] = mean((eps_pred[i] - noise[i])**2)``,
    - ``complexity_term[i] = mean(c[i] * |eps_pred[i] - noise[i]|)``,
    - ``loss[i] = mse[i] + lambda_reg * complexity_term[i]``.

    Shapes: ``x0``, ``noise`` ``[B, C, H, W]`` (data in [-1, 1]); ``t`` LongTensor ``[B]``. Returns a dict of
    ``[B]`` float32 tensors ``{"loss", "mse", "complexity_term"}``; the caller averages (or weights) them.
    ``loss.mean()`` is :func:`modified_loss` of the same prediction. The network may run under autocast (a
    caller's ``torch.autocast``); the loss itself is always computed in float32.
    """
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    eps_pred = eps_model(x_t, t)
    with torch.autocast(x0.device.type, enabled=False):
        complexity = compute_complexity(x0.float(), complexity_mode)
        mse, complexity_term = loss_terms(eps_pred.float(), noise.float(), complexity)
    return {"loss": mse + lambda_reg * complexity_term, "mse": mse, "complexity_term": complexity_term}


def modified_loss(
    pred_noise: torch.Tensor, true_noise: torch.Tensor, complexity: torch.Tensor, lambda_reg: float = 0.1
) -> torch.Tensor:
    """The design's loss: ``mean((pred - true)**2) + lambda_reg * mean(complexity * |pred - true|)``.

    A scalar. With ``lambda_reg = 0`` it is exactly ``F.mse_loss(pred_noise, true_noise)``.
    """
    squared_error, complexity_term = loss_terms(pred_noise, true_noise, complexity)
    return squared_error.mean() + lambda_reg * complexity_term.mean()


# ----------------------------------------------------------------------------------------------------
# Adaptive-step DDIM
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def adaptive_ddim_sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    base_step_size: float,
    min_step: float,
    max_step: float,
    eta: float = 0.0,
    clip_x0: bool = False,
    complexity_mode: ComplexityMode = "scaled",
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM where each sample picks its own next timestep from the complexity of its current x0 prediction.

    Every sample starts at ``t = T - 1``. At each iteration the unfinished samples share one batched model
    call at their own timesteps; each then takes a DDIM step of
    ``round(adaptive_step_size(complexity_score(x0_pred), base_step_size, min_step, max_step))`` training
    timesteps (at least 1), landing no lower than 0; a sample at ``t = 0`` steps to ``alpha_prev = 1`` and
    is finished. With ``min_step == max_step == k`` this is DDIM over ``T-1, T-1-k, ..., 0``.

    Returns ``(x_0 [B, ...], nfe [B])``: the samples and the number of model evaluations each one took.
    """
    if x_T.shape[0] == 0:
        raise ValueError("adaptive_ddim_sample needs at least one sample")
    B = x_T.shape[0]
    T = alphas_cumprod.shape[0]
    x = x_T.clone()
    t = torch.full((B,), T - 1, dtype=torch.long, device=x.device)
    nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)

    while not bool(done.all()):
        active = ~done
        x_a, t_a = x[active], t[active]
        eps = eps_model(x_a, t_a)
        nfe[active] += 1

        alpha_t = _gather(alphas_cumprod, t_a, x_a)
        # Where the step lands depends on x0_pred, so form it first (ddim_step recomputes it identically).
        x0_pred = predict_x0(x_a, eps, alpha_t, clip_x0)
        dt = adaptive_step_size(complexity_score(x0_pred, complexity_mode), base_step_size, min_step, max_step)
        stride = dt.round().long().clamp(min=1)
        finishing = t_a == 0
        t_prev = (t_a - stride).clamp(min=0)
        alpha_prev = torch.where(
            finishing.reshape(alpha_t.shape), torch.ones_like(alpha_t), _gather(alphas_cumprod, t_prev, x_a)
        )

        noise = randn(x_a.shape, _select(generator, active), x_a) if eta > 0 else None
        x_prev, _ = ddim_step(x_a, eps, alpha_t, alpha_prev, eta, noise, clip_x0)
        x[active] = x_prev
        t[active] = t_prev
        newly_done = torch.zeros_like(done)
        newly_done[active] = finishing
        done |= newly_done
    return x, nfe
