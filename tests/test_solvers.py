"""DPM-Solver++ and UniPC (models/solvers.py): exact against diffusers' schedulers for every step count from 1 to
25, orders 2 and 3 and each of diffusers' spacings, right where diffusers returns NaN, and of the convergence
order each claims on Gaussian data, where the exact answer is a closed form (benchmarks/gaussian_solvers.py)."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from models.diffusion import ddim_sample, ddim_timesteps
from models.solvers import dpm_solver_order, dpm_solver_sample, unipc_order, unipc_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SPACINGS = ("linspace", "leading", "trailing")
STEPS = range(1, 26)
MIX = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear, time-dependent stand-in for a network."""
    scale = 0.5 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000
    return torch.tanh(torch.einsum("ij,bjhw->bihw", MIX.to(x.dtype), x)) * scale + 0.1 * torch.sin(3 * x)


def diffusers_loop(scheduler, steps: int, x: torch.Tensor) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def start(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def assert_float32_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max() + 1e-6


def dpm(order: int, spacing: str, lower_order_final: bool = True):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=order,
        solver_type="midpoint",
        lower_order_final=lower_order_final,
        final_sigmas_type="zero",
        timestep_spacing=spacing,
    )


def unipc(order: int, variant: str, spacing: str, lower_order_final: bool = True):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        solver_order=order,
        solver_type=variant,
        predict_x0=True,
        lower_order_final=lower_order_final,
        final_sigmas_type="zero",
        timestep_spacing=spacing,
    )


@pytest.mark.parametrize(("order", "spacing", "lower_order_final"), itertools.product((2, 3), SPACINGS, (True, False)))
def test_dpm_solver_gives_diffusers_images_for_every_step_count(order, spacing, lower_order_final):
    for steps in STEPS:
        scheduler = dpm(order, spacing, lower_order_final)
        theirs = diffusers_loop(scheduler, steps, start(steps))
        ac = scheduler.alphas_cumprod.double()
        ours = dpm_solver_sample(eps_model, start(steps), ac, scheduler.timesteps, order, lower_order_final)
        assert_float32_close(ours, theirs)


@pytest.mark.parametrize(("order", "spacing"), itertools.product((2, 3), SPACINGS))
def test_unipc_bh2_gives_diffusers_images_for_every_step_count(order, spacing):
    for steps in STEPS:
        scheduler = unipc(order, "bh2", spacing)
        theirs = diffusers_loop(scheduler, steps, start(steps))
        ac = scheduler.alphas_cumprod.double()
        assert_float32_close(unipc_sample(eps_model, start(steps), ac, scheduler.timesteps, order, "bh2"), theirs)


@pytest.mark.parametrize(
    ("order", "variant", "lower_order_final"),
    [(2, "bh1", True), (3, "bh1", True), (2, "bh2", False), (3, "bh1", False)],
)
def test_unipc_is_finite_where_diffusers_last_step_is_not_and_lands_on_its_last_data_prediction(
    order, variant, lower_order_final
):
    """bh1's B(h) = h is infinite on the step to alpha = 1 (diffusers computes -inf * 0), and without
    lower_order_final diffusers' last step divides by a zero ratio: NaN or infinite there (or, at order 3, a
    singular linear system). Every step before it is
    diffusers' own, and the last one (first order) returns the data prediction diffusers holds at that point."""
    for spacing, steps in itertools.product(SPACINGS, (1, 2, 3, 7, 16, 25)):
        scheduler = unipc(order, variant, spacing, lower_order_final)
        try:
            theirs = diffusers_loop(scheduler, steps, start(steps))
        except torch.linalg.LinAlgError:  # order 3 without lower_order_final: a singular system at the last step
            theirs = None
        if theirs is not None and (steps > 1 or variant == "bh1"):
            assert not torch.isfinite(theirs).any()
        ac = scheduler.alphas_cumprod.double()
        ours = unipc_sample(eps_model, start(steps), ac, scheduler.timesteps, order, variant, lower_order_final)
        assert_float32_close(ours, scheduler.model_outputs[-1])


def test_first_order_dpm_solver_is_deterministic_ddim():
    from models.diffusion import alphas_cumprod_from_betas, make_beta_schedule

    ac = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000))
    x = start(0).double()
    for steps, spacing in itertools.product((1, 4, 20), ("uniform", "quad", "trailing")):
        ts = ddim_timesteps(1000, steps, spacing)
        ours = dpm_solver_sample(eps_model, x, ac, ts, order=1)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ddim_sample(eps_model, x, ac, ts), rtol=1e-12, atol=1e-12)


def test_the_order_schedules_warm_up_and_end_at_first_order():
    assert [dpm_solver_order(i, 20, 3, True) for i in range(20)] == [1, 2] + [3] * 17 + [1]
    assert [dpm_solver_order(i, 10, 3, True) for i in range(10)] == [1, 2] + [3] * 6 + [2, 1]  # n < 15
    assert [dpm_solver_order(i, 10, 3, False) for i in range(10)] == [1, 2] + [3] * 7 + [1]
    assert [unipc_order(i, 6, 3, True) for i in range(6)] == [1, 2, 3, 3, 2, 1]
    assert [unipc_order(i, 6, 3, False) for i in range(6)] == [1, 2, 3, 3, 3, 1]
    assert [dpm_solver_order(i, 1, 3, True) for i in range(1)] == [unipc_order(0, 1, 3, True)] == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timesteps": torch.tensor([500, 500, 0])}, "descend strictly"),
        ({"timesteps": torch.tensor([100, 400])}, "descend strictly"),
        ({"timesteps": torch.tensor([1000, 0])}, r"within \[0, 999\]"),
        ({"timesteps": torch.tensor([], dtype=torch.long)}, "descend strictly"),
        ({"order": 4}, "order must be 1, 2 or 3"),
    ],
)
def test_bad_arguments_are_refused_with_what_is_wrong(kwargs, message):
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    args = {"timesteps": torch.tensor([999, 500, 0]), "order": 2, **kwargs}
    for sample in (dpm_solver_sample, unipc_sample):
        with pytest.raises(ValueError, match=message):
            sample(eps_model, start(0), ac, args["timesteps"], args["order"])
    with pytest.raises(ValueError, match="variant"):
        unipc_sample(eps_model, start(0), ac, torch.tensor([999, 0]), 2, "bh3")


def test_each_solver_converges_at_its_order_on_gaussian_data():
    """Exact x_0 for N(0, s^2) data (the log-SNR-uniform grid of the benchmark): the fitted order of each
    solver from NFE 25 to 200. DPM-Solver++ 3M is second order end to end: its first step (first order, there
    is no history yet) leaves an O(h^2) error that its later third-order steps cannot remove."""
    import gaussian_solvers as g

    alphas_cumprod, timesteps = g.vp_grid()
    eps = g.optimal_eps(alphas_cumprod, 0.5)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * g.std(float(alphas_cumprod[-1]), 0.5)
    x0, _ = g.reference(x, alphas_cumprod, 0.5)
    solvers = g.solvers(eps, alphas_cumprod, timesteps)
    expected = {"DDIM (eta 0)": 1, "DPM-Solver++ 2M": 2, "DPM-Solver++ 3M": 2, "UniPC bh2, order 2": 3}
    for name, order in expected.items():
        errors = [math.sqrt(g.mse(solvers[name](x, n), x0)) for n in (25, 50, 100, 200)]
        slopes = [
            math.log2(a / b) * math.log(2) / math.log(n2 / n1)
            for a, b, n1, n2 in zip(errors[:-1], errors[1:], (25, 50, 100), (50, 100, 200), strict=True)
        ]
        assert abs(slopes[-1] - order) < 0.15, (name, slopes)
    assert math.sqrt(g.mse(solvers["DPM-Solver++ 3M"](x, 50), x0)) < math.sqrt(
        g.mse(solvers["DPM-Solver++ 2M"](x, 50), x0)
    )
