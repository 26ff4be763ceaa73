"""Higher-order solvers of the probability-flow ODE in data prediction: DPM-Solver++ and UniPC.

Both sample on :func:`models.diffusion.ddim_sample`'s contract: any ``eps_model(x_t, t)``, ``alphas_cumprod``
(DDIM's alpha_t), the descending ``timesteps`` that :func:`models.diffusion.ddim_timesteps` returns, and one
more step after the last timestep to alpha = 1, the clean image. No noise is drawn: the result is a function
of ``x_T``. Every coefficient is computed in float64 (Python floats) and applied in ``x_T``'s dtype.

Notation (Lu et al. 2022): ``alpha = sqrt(alpha_t)``, ``sigma = sqrt(1 - alpha_t)``, the half log-SNR
``lambda = log(alpha / sigma)``, and the data prediction ``x0 = (x - sigma * eps) / alpha``. A step from
``s`` to ``t`` has length ``h = lambda_t - lambda_s > 0``. The step to alpha = 1 has ``lambda = +inf``: its
length is infinite, every multistep correction there vanishes or diverges, so both solvers take it at first
order, which lands exactly on the last data prediction (as diffusers does with ``final_sigmas_type="zero"``).

- :func:`dpm_solver_sample`: DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2 for order 2,
  the "midpoint" form; order 3 as in their reference code). Exactly diffusers'
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero")``:
  the first steps warm up at lower orders, and with ``lower_order_final`` the second-to-last step of a run of
  fewer than 15 steps is at most second order.
- :func:`unipc_sample`: UniPC (Zhao et al. 2023): the UniP predictor and, after every step but the last, the
  UniC corrector, which reuses the model evaluation at the predicted point to refine it (no extra evaluation),
  variants ``bh1`` (B(h) = h) and ``bh2`` (B(h) = e^h - 1). Exactly diffusers' ``UniPCMultistepScheduler(
  predict_x0=True, final_sigmas_type="zero")``, except where diffusers' last step is not finite: with ``bh1``
  it computes ``-inf * 0`` (NaN), and with ``lower_order_final=False`` it takes that step at full order and
  divides by a zero ratio (NaN, infinities, or at order 3 a singular system). Here the last step is always
  first order and returns the last data prediction, the step's limit.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
import torch

from models.diffusion import EpsModel, _check_choice

Variant = Literal["bh1", "bh2"]


def _check(order: int, timesteps: torch.Tensor, num_train_steps: int) -> list[int]:
    """The timesteps as ints, after checking that they descend strictly within the schedule."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    ts = [int(t) for t in timesteps.tolist()]
    if not ts or any(a <= b for a, b in itertools.pairwise(ts)) or ts[-1] < 0 or ts[0] >= num_train_steps:
        raise ValueError(f"timesteps must descend strictly within [0, {num_train_steps - 1}], got {ts}")
    return ts


def _schedule(alphas_cumprod: torch.Tensor, ts: list[int]) -> tuple[list[float], list[float], list[float]]:
    """alpha, sigma and lambda at each timestep, then at alpha = 1 (sigma 0, lambda +inf), in float64."""
    a = [*alphas_cumprod[torch.tensor(ts, device=alphas_cumprod.device)].double().tolist(), 1.0]
    alpha = [math.sqrt(v) for v in a]
    sigma = [math.sqrt(1.0 - v) for v in a]
    lam = [math.log(al / s) if s > 0 else math.inf for al, s in zip(alpha, sigma, strict=True)]
    return alpha, sigma, lam


def _data_prediction(
    eps_model: EpsModel, x: torch.Tensor, t: int, alpha: float, sigma: float, clip_x0: bool
) -> torch.Tensor:
    """x0 from the model's eps at ``t``, clamped to [-1, 1] with ``clip_x0`` (not in diffusers' contract)."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    x0 = (x - sigma * eps_model(x, t_batch).to(x.dtype)) / alpha
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


def dpm_solver_order(i: int, n: int, order: int, lower_order_final: bool) -> int:
    """The order of step ``i`` of ``n``: warm-up (at most i + 1), first at the last step (to alpha = 1), and
    with ``lower_order_final`` at most second at the second-to-last step when ``n < 15`` (diffusers' rule)."""
    if order == 1 or i == 0 or i == n - 1:
        return 1
    if order == 2 or i == 1 or (lower_order_final and i == n - 2 and n < 15):
        return 2
    return 3


def dpm_solver_step(
    x: torch.Tensor, x0s: list[torch.Tensor], lam: list[float], i: int, alpha_t: float, sigma_ratio: float, k: int
) -> torch.Tensor:
    """DPM-Solver++'s multistep update of order ``k`` from timestep ``i`` to ``i + 1``; ``x0s`` holds the data
    predictions at ``i, i - 1, ...`` (newest first), ``sigma_ratio`` is ``sigma_{i+1} / sigma_i``."""
    h = lam[i + 1] - lam[i]
    phi = -math.expm1(-h)  # 1 - e^{-h}: 1 at the step to alpha = 1
    x_next = sigma_ratio * x + (alpha_t * phi) * x0s[0]
    if k == 2:
        r0 = (lam[i] - lam[i - 1]) / h
        x_next = x_next + (0.5 * alpha_t * phi / r0) * (x0s[0] - x0s[1])
    elif k == 3:
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        d1_0, d1_1 = (x0s[0] - x0s[1]) / r0, (x0s[1] - x0s[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x_next = x_next - (alpha_t * (phi / h - 1.0)) * d1 - (alpha_t * ((h - phi) / h**2 - 0.5)) * d2
    return x_next


@torch.no_grad()
def dpm_solver_sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    order: int = 2,
    lower_order_final: bool = True,
    clip_x0: bool = False,
) -> torch.Tensor:
    """DPM-Solver++ (multistep, data prediction) from ``x_T`` through the descending ``timesteps`` to x_0, one
    model evaluation per timestep. ``order`` 1 is DDIM with eta 0 (the same images to rounding). ``clip_x0``
    clamps every data prediction to [-1, 1] (as DDIM's ``clip_x0`` does; diffusers' images are without it)."""
    ts = _check(order, timesteps, alphas_cumprod.shape[0])
    alpha, sigma, lam = _schedule(alphas_cumprod, ts)
    x, x0s = x_T, []
    for i, t in enumerate(ts):
        x0s = [_data_prediction(eps_model, x, t, alpha[i], sigma[i], clip_x0), *x0s[:2]]
        k = dpm_solver_order(i, len(ts), order, lower_order_final)
        x = dpm_solver_step(x, x0s, lam, i, alpha[i + 1], sigma[i + 1] / sigma[i], k)
    return x


def _unipc_weights(rks: list[float], hh: float, variant: Variant, order: int) -> tuple[np.ndarray, np.ndarray, float]:
    """UniPC's linear system for ``order``: R (rows r_k^(j-1), with r = 1 appended) and b (the phi functions
    over B(h)), and B(h); ``hh = -h`` (data prediction)."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = np.array([*rks, 1.0])
    h_phi_k, factorial, rows, rhs = math.expm1(hh) / hh - 1.0, 1, [], []
    for j in range(1, order + 1):
        rows.append(rks ** (j - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.stack(rows), np.array(rhs), b_h


def _differences(x0s: list[torch.Tensor], lam: list[float], s: int, h: float, k: int):
    """The ratios r_m = (lambda_{s-m} - lambda_s) / h and the scaled differences (x0_{s-m} - x0_s) / r_m for
    m = 1..k-1; ``x0s`` holds the data predictions at ``s, s - 1, ...`` (newest first)."""
    rks = [(lam[s - m] - lam[s]) / h for m in range(1, k)]
    return rks, [(x0s[m] - x0s[0]) / r for m, r in zip(range(1, k), rks, strict=True)]


def _weighted(weights: np.ndarray, tensors: list[torch.Tensor]) -> torch.Tensor | float:
    return sum((float(w) * d for w, d in zip(weights, tensors, strict=True)), start=0.0)


def unipc_predictor(
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    lam: list[float],
    i: int,
    alpha_t: float,
    sigma_ratio: float,
    k: int,
    variant: Variant,
) -> torch.Tensor:
    """UniP of order ``k`` from timestep ``i`` to ``i + 1`` (``x0s``: data predictions at ``i, i - 1, ...``)."""
    h = lam[i + 1] - lam[i]
    x_next = sigma_ratio * x - (alpha_t * math.expm1(-h)) * x0s[0]
    if k == 1:
        return x_next  # no correction term: at the step to alpha = 1 (h = inf) this is x0s[0] exactly
    rks, d1s = _differences(x0s, lam, i, h, k)
    rows, rhs, b_h = _unipc_weights(rks, -h, variant, k)
    rhos = np.array([0.5]) if k == 2 else np.linalg.solve(rows[:-1, :-1], rhs[:-1])
    return x_next - (alpha_t * b_h) * _weighted(rhos, d1s)


def unipc_corrector(
    x_prev: torch.Tensor,
    x0_t: torch.Tensor,
    x0s: list[torch.Tensor],
    lam: list[float],
    i: int,
    alpha_t: float,
    sigma_ratio: float,
    k: int,
    variant: Variant,
) -> torch.Tensor:
    """UniC of order ``k``: the step from timestep ``i - 1`` (``x_prev``; ``x0s``: data predictions at
    ``i - 1, i - 2, ...``) to ``i`` again, now also with ``x0_t``, the data prediction at the predicted point."""
    h = lam[i] - lam[i - 1]
    rks, d1s = _differences(x0s, lam, i - 1, h, k)
    rows, rhs, b_h = _unipc_weights(rks, -h, variant, k)
    rhos = np.array([0.5]) if k == 1 else np.linalg.solve(rows, rhs)
    x_t = sigma_ratio * x_prev - (alpha_t * math.expm1(-h)) * x0s[0]
    return x_t - (alpha_t * b_h) * (_weighted(rhos[:-1], d1s) + float(rhos[-1]) * (x0_t - x0s[0]))


def unipc_order(i: int, n: int, order: int, lower_order_final: bool) -> int:
    """The predictor's order at step ``i`` of ``n``: warm-up (at most i + 1), with ``lower_order_final`` at most
    the steps left, and first at the last step (to alpha = 1)."""
    k = min(order, n - i) if lower_order_final else order
    return 1 if i == n - 1 else min(k, i + 1)


@torch.no_grad()
def unipc_sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    order: int = 2,
    variant: Variant = "bh2",
    lower_order_final: bool = True,
    clip_x0: bool = False,
) -> torch.Tensor:
    """UniPC (data prediction) from ``x_T`` through the descending ``timesteps`` to x_0: the predictor at every
    step, the corrector on every point the predictor reached but the last; one evaluation per timestep.
    ``clip_x0`` clamps every data prediction to [-1, 1] (diffusers' images are without it)."""
    _check_choice("variant", variant, Variant)
    ts = _check(order, timesteps, alphas_cumprod.shape[0])
    alpha, sigma, lam = _schedule(alphas_cumprod, ts)
    x, x_prev, x0s, k = x_T, x_T, [], 0
    for i, t in enumerate(ts):
        x0_t = _data_prediction(eps_model, x, t, alpha[i], sigma[i], clip_x0)
        if i > 0:
            x = unipc_corrector(x_prev, x0_t, x0s, lam, i, alpha[i], sigma[i] / sigma[i - 1], k, variant)
        x0s = [x0_t, *x0s[: order - 1]]
        k = unipc_order(i, len(ts), order, lower_order_final)
        x_prev, x = x, unipc_predictor(x, x0s, lam, i, alpha[i + 1], sigma[i + 1] / sigma[i], k, variant)
    return x
