"""Every sampler against the exact answer: Gaussian data, where the optimal eps-model and the probability-flow
ODE are closed forms. A markdown table + JSON; no GPU, about a minute on 2 cores.

    python benchmarks/gaussian_solvers.py [--grid vp|ddpm] [--spacing linspace] [--scale 0.5] [--samples 64]

Data x_0 ~ N(0, s^2 I) (s = ``--scale``; images of 3 x 16 x 16, float64). With ``std_t = sqrt(a_t s^2 + 1 - a_t)``:

- the optimal eps-model is ``E[eps | x_t] = sqrt(1 - a_t) x_t / std_t^2``;
- the probability-flow ODE carries x_t along ``x_t / std_t = const``, so from the first timestep the exact
  state at the last one, t_min, is ``x_T std_min / std_max``;
- every sampler ends with the same step to alpha = 1, the data prediction at t_min; the reference x_0 is that
  prediction at the exact state, ``x_min sqrt(a_min) s^2 / std_min^2``. (The ODE's own end point at alpha = 1,
  ``x_T s / std_max``, differs from it by a floor that no number of steps removes; the report gives it.)

Grids (``--grid``):

- ``vp`` (the default, the yardstick): DDPM's linear schedule in continuous time (beta from 0.1 to 20,
  ``a(t) = exp(-0.1 t - 9.95 t^2)``) on 1,000,000 timesteps from t = 1e-3 (index 0; DDPM's t = 0) to t = 1, and
  NFE timesteps uniform in log-SNR (DPM-Solver's spacing for this case), rounded to the grid: the steps shrink
  evenly, so each solver shows its convergence order.
- ``ddpm``: DDPM's discrete schedule (T = 1000) and ``ddim_timesteps(1000, NFE, --spacing)`` (default
  ``linspace``, 999 down to 0; ``quad`` is the sweep's): what a user runs. With linspace the last steps, from
  t ~ 1000 / NFE to 0, stay long in log-SNR however many steps there are, and the multistep solvers' orders do
  not show.

Each row: the mean squared distance to the reference at NFE 5, 10, 20, 50, 100, and the fitted convergence
order, minus the slope of log RMS error against log NFE over NFE 20..100. The design's adaptive sampler (eta 0,
no clipping, min_step 1, max_step the whole grid) starts at the last index and ends at 0 like the others; its
base_step_size is bisected per column so that its mean NFE is the nearest it gets to the column's (shown).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.diffusion import (
    adaptive_ddim_sample,
    alphas_cumprod_from_betas,
    ddim_sample,
    ddim_timesteps,
    make_beta_schedule,
)
from models.solvers import dpm_solver_sample, unipc_sample

NFES = (5, 10, 20, 50, 100)
FIT = (20, 50, 100)  # the NFEs the order is fitted over (5 and 10 are before the asymptotic regime)
VP_STEPS, VP_T_MIN = 1_000_000, 1e-3


def vp_grid() -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
    """DDPM's schedule in continuous time on a fine grid, and NFE timesteps uniform in log-SNR on it."""
    t = torch.linspace(VP_T_MIN, 1.0, VP_STEPS, dtype=torch.float64)
    alphas_cumprod = torch.exp(-0.1 * t - 0.5 * (20.0 - 0.1) * t**2)
    log_snr = (alphas_cumprod / (1 - alphas_cumprod)).log()  # decreasing in the index

    def timesteps(n: int) -> torch.Tensor:
        targets = torch.linspace(float(log_snr[-1]), float(log_snr[0]), n, dtype=torch.float64)
        index = torch.searchsorted(-log_snr, -targets).clamp(max=VP_STEPS - 1)  # nearest from above
        return torch.unique(index).flip(0) if n > 1 else torch.tensor([VP_STEPS - 1])

    return alphas_cumprod, timesteps


def ddpm_grid(spacing: str = "linspace") -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
    return alphas_cumprod_from_betas(make_beta_schedule("linear", 1000)), lambda n: ddim_timesteps(1000, n, spacing)


def std(a: torch.Tensor | float, scale: float) -> torch.Tensor | float:
    return (a * scale**2 + 1 - a) ** 0.5


def optimal_eps(alphas_cumprod: torch.Tensor, scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas_cumprod[t].reshape(-1, *[1] * (x.dim() - 1)).to(x)
        return (1 - a).sqrt() * x / std(a, scale) ** 2

    return eps


def reference(x_T: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference x_0 (the exact ODE from the grid's last index to 0, then the data prediction at 0) and the
    ODE's end point at alpha = 1."""
    a_first, a_last = float(alphas_cumprod[-1]), float(alphas_cumprod[0])
    x_last = x_T * std(a_last, scale) / std(a_first, scale)
    return x_last * math.sqrt(a_last) * scale**2 / std(a_last, scale) ** 2, x_T * scale / std(a_first, scale)


def solvers(eps, alphas_cumprod: torch.Tensor, ts) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    return {
        "DDIM (eta 0)": lambda x, n: ddim_sample(eps, x, alphas_cumprod, ts(n)),
        "DPM-Solver++ 2M": lambda x, n: dpm_solver_sample(eps, x, alphas_cumprod, ts(n), order=2),
        "DPM-Solver++ 3M": lambda x, n: dpm_solver_sample(eps, x, alphas_cumprod, ts(n), order=3),
        "UniPC bh1, order 2": lambda x, n: unipc_sample(eps, x, alphas_cumprod, ts(n), order=2, variant="bh1"),
        "UniPC bh2, order 2": lambda x, n: unipc_sample(eps, x, alphas_cumprod, ts(n), order=2, variant="bh2"),
        "UniPC bh2, order 3": lambda x, n: unipc_sample(eps, x, alphas_cumprod, ts(n), order=3, variant="bh2"),
    }


def adaptive_at(eps, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, nfe: int) -> tuple[torch.Tensor, float]:
    """The adaptive sampler with the base_step_size (bisected in log space) whose mean NFE is nearest ``nfe``."""

    def run(log_base: float) -> tuple[torch.Tensor, float]:
        last = float(alphas_cumprod.shape[0] - 1)
        x0, n = adaptive_ddim_sample(eps, x_T, alphas_cumprod, math.exp(log_base), 1.0, last)
        return x0, float(n.double().mean())

    lo, hi, best = -12.0, 20.0, None
    for _ in range(30):
        mid = (lo + hi) / 2
        x0, n = run(mid)
        if best is None or abs(n - nfe) < abs(best[1] - nfe):
            best = (x0, n)
        lo, hi = (mid, hi) if n > nfe else (lo, mid)  # a larger base takes longer strides: fewer evaluations
    return best


def fitted_order(errors: dict[int, float], nfe: dict[int, float] | None = None) -> float:
    """Minus the least-squares slope of log RMS error against log NFE (``nfe``: the NFE each column reached)
    over the columns FIT."""
    x = np.log([(nfe or {})[n] if nfe else n for n in FIT])
    y = np.log([math.sqrt(errors[n]) for n in FIT])
    return float(-np.polyfit(x, y, 1)[0])


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def measure(grid: str, scale: float, samples: int, spacing: str = "linspace") -> dict:
    alphas_cumprod, ts = vp_grid() if grid == "vp" else ddpm_grid(spacing)
    eps = optimal_eps(alphas_cumprod, scale)
    x_T = torch.randn(samples, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = x_T * std(float(alphas_cumprod[-1]), scale)  # drawn from the marginal at the first timestep
    x0_ref, ode_end = reference(x_T, alphas_cumprod, scale)
    rows = []
    for name, solve in solvers(eps, alphas_cumprod, ts).items():
        errors = {n: mse(solve(x_T, n), x0_ref) for n in NFES}
        rows.append({"sampler": name, "mse": errors, "nfe": {n: float(n) for n in NFES}, "order": fitted_order(errors)})
    runs = {n: adaptive_at(eps, x_T, alphas_cumprod, n) for n in NFES}
    errors = {n: mse(runs[n][0], x0_ref) for n in NFES}
    rows.append({"sampler": "adaptive (design)", "mse": errors, "nfe": {n: runs[n][1] for n in NFES}})
    rows[-1]["order"] = fitted_order(errors, rows[-1]["nfe"])
    name = grid if grid == "vp" else f"{grid}, {spacing} spacing"
    return {"grid": name, "scale": scale, "samples": samples, "floor_mse": mse(x0_ref, ode_end), "rows": rows}


def table(report: dict) -> str:
    head = "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " | fitted order |"
    lines = [head, "|---|" + "---:|" * (len(NFES) + 1)]
    for r in report["rows"]:
        cells = []
        for n in NFES:
            shown = f"{r['mse'][n]:.2e}"
            cells.append(shown if r["nfe"][n] == n else f"{shown} (NFE {r['nfe'][n]:.1f})")
        lines.append(f"| {r['sampler']} | " + " | ".join(cells) + f" | {r['order']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("vp", "ddpm"), default="vp", help="the schedule and spacing (see above)")
    parser.add_argument("--spacing", choices=("linspace", "quad", "trailing", "uniform"), default="linspace")
    parser.add_argument("--scale", type=float, default=0.5, help="the data's standard deviation s")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = measure(args.grid, args.scale, args.samples, args.spacing)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(
        f"grid {report['grid']}, s = {report['scale']}, {report['samples']} samples: mean squared distance to exact x_0"
    )
    print(table(report))
    print(f"(the reference's distance to the ODE's own end point at alpha = 1: {report['floor_mse']:.2e})")
    return report


if __name__ == "__main__":
    main()
