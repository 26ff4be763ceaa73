"""The diffusion math against closed forms, hand computations and exact expected values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.diffusion import (
    adaptive_ddim_sample,
    adaptive_step_size,
    alphas_cumprod_from_betas,
    complexity_score,
    compute_complexity,
    ddim_encode,
    ddim_reconstruct,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    lerp,
    loss_terms,
    make_beta_schedule,
    modified_loss,
    predict_x0,
    q_sample,
    randn,
    slerp,
    training_losses,
)

T = 1000


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return alphas_cumprod_from_betas(make_beta_schedule("linear", T))


def gaussian_oracle(alphas_cumprod: torch.Tensor, mu: float, s: float):
    """The exact E[eps | x_t] when the data are N(mu, s**2) per coordinate: a perfect eps-model."""

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas_cumprod[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return eps_model


def target_oracle(alphas_cumprod: torch.Tensor, targets: torch.Tensor, calls: list[int] | None = None):
    """An eps-model for two samples whose x0 prediction is always ``targets[i]`` for sample i.

    Channel 1 tells the samples apart: the targets hold -1 (sample 0) or +1 (sample 1) there, and so must
    x_T; the eta = 0 trajectory keeps that sign, so the model needs no state to know whose turn it is.
    """

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(x_t.shape[0])
        a = alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        idx = (x_t[:, 1].mean(dim=(1, 2)) > 0).long()
        return (x_t - a.sqrt() * targets[idx]) / (1 - a).sqrt()

    return eps_model


def two_targets(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for :func:`target_oracle` (sample 0 flat, sample 1 a checkerboard) and a matching x_T."""
    targets = torch.zeros(2, 2, size, size, dtype=torch.float64)
    targets[1, 0] = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 2.0 - 1.0
    targets[:, 1] = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1)
    x_T = torch.randn(2, 2, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T[:, 1] = targets[:, 1]
    return targets, x_T


# ----- schedules and q_sample


def test_linear_schedule_closed_form():
    betas = make_beta_schedule("linear", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    k = np.arange(T)
    np.testing.assert_allclose(betas.numpy(), 1e-4 + k * (0.02 - 1e-4) / (T - 1), rtol=0, atol=1e-15)
    abar = alphas_cumprod_from_betas(betas).numpy()
    np.testing.assert_allclose(abar, np.cumprod(1 - (1e-4 + k * (0.02 - 1e-4) / (T - 1))), rtol=1e-12)
    assert abar[-1] == pytest.approx(4.035829e-05, rel=1e-5)  # DDPM's alpha-bar_T


def test_cosine_schedule_closed_form():
    abar = alphas_cumprod_from_betas(make_beta_schedule("cosine", T)).numpy()
    s = 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    expected = f[1:] / f[0]
    # Betas are clipped at 0.999 only at the very end; everywhere else the closed form holds exactly.
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-10)
    assert make_beta_schedule("cosine", T).max() == pytest.approx(0.999)


def test_schedule_rejects_unknown_kind():
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        make_beta_schedule("sigmoid", T)  # type: ignore[arg-type]


def test_q_sample_statistics(alphas_cumprod):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    t = torch.full((n,), 300, dtype=torch.long)
    x_t = q_sample(x0, t, torch.randn(n, 1, generator=g, dtype=torch.float64), alphas_cumprod)
    a = alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=4 * math.sqrt((1 - a) / n))
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.01)


def test_q_sample_is_exact_per_sample_timestep(alphas_cumprod):
    x0 = torch.tensor([[1.0], [-1.0]])
    noise = torch.tensor([[0.5], [2.0]])
    t = torch.tensor([0, 999])
    out = q_sample(x0, t, noise, alphas_cumprod)
    for i in range(2):
        a = alphas_cumprod[t[i]].item()
        assert out[i, 0].item() == pytest.approx(math.sqrt(a) * x0[i, 0].item() + math.sqrt(1 - a) * noise[i, 0].item())


# ----- timesteps


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        ("uniform", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("quad", [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]),
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
def test_ddim_timesteps_exact(spacing, expected):
    ts = ddim_timesteps(T, 10, spacing)
    assert ts.dtype == torch.long
    assert ts.tolist() == expected


@pytest.mark.parametrize("spacing", ["uniform", "quad", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [2, 7, 20, 50, 100, 333, 1000])
def test_ddim_timesteps_properties(spacing, steps):
    ts = ddim_timesteps(T, steps, spacing)
    assert ts[0] < T and ts[-1] >= 0
    assert (ts[-1] == 0) == (spacing != "trailing" or steps == T), "trailing stops at T/S - 1"
    assert (ts[0] == T - 1) == (spacing in ("linspace", "trailing") or (spacing == "uniform" and steps == T))
    assert bool((ts[:-1] > ts[1:]).all()), "strictly descending"
    if spacing == "quad":
        assert len(ts) <= steps  # repeated small timesteps are dropped
    else:
        assert len(ts) == steps


@pytest.mark.parametrize(
    ("ours", "theirs"), [("uniform", "leading"), ("linspace", "linspace"), ("trailing", "trailing")]
)
@pytest.mark.parametrize("steps", [2, 3, 7, 10, 20, 50, 100, 333, 999])
def test_ddim_timesteps_match_diffusers(ours, theirs, steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=T, timestep_spacing=theirs, steps_offset=0)
    scheduler.set_timesteps(steps)
    assert ddim_timesteps(T, steps, ours).tolist() == scheduler.timesteps.tolist()


def test_ddim_timesteps_quad_matches_the_ddim_repository_at_s100():
    raw = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), 100) ** 2]
    assert ddim_timesteps(T, 100, "quad").tolist() == sorted(set(raw), reverse=True)


def test_ddim_timesteps_rejects_bad_input():
    with pytest.raises(ValueError, match="allowed: uniform, quad, linspace, trailing"):
        ddim_timesteps(T, 10, "linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(T, 0)
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(T, T + 1)


# ----- one DDIM step


def test_ddim_step_matches_hand_computation():
    x_t, eps, a, a_prev, eta, z = 0.5, 0.2, 0.64, 0.81, 0.5, 1.0
    # By hand: x0 = (0.5 - 0.6 * 0.2) / 0.8 = 0.475
    #          sigma = 0.5 * sqrt(0.19 / 0.36 * (1 - 0.64 / 0.81)) = 0.166409
    #          coeff = sqrt(1 - 0.81 - sigma^2) = 0.402874
    #          x_prev = 0.9 * 0.475 + coeff * 0.2 + sigma * 1 = 0.674484
    x_prev, x0 = ddim_step(
        torch.tensor([x_t], dtype=torch.float64),
        torch.tensor([eps], dtype=torch.float64),
        a,
        a_prev,
        eta,
        noise=torch.tensor([z], dtype=torch.float64),
    )
    assert x0.item() == pytest.approx(0.475, abs=1e-12)
    assert x_prev.item() == pytest.approx(0.674484, abs=1e-6)


def test_ddim_step_eta0_to_alpha1_recovers_x0_with_oracle_noise(alphas_cumprod):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_prev, x0_pred = ddim_step(x_t, noise, a, 1.0, eta=0.0)
    torch.testing.assert_close(x_prev, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(x0_pred, x0, rtol=0, atol=1e-10)


def test_ddim_step_eta_requires_noise_and_eta0_ignores_it():
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, x, 0.5, 0.7, eta=1.0)
    a, _ = ddim_step(x, x, 0.5, 0.7, eta=0.0)
    b, _ = ddim_step(x, x, 0.5, 0.7, eta=0.0, noise=torch.randn_like(x))
    assert torch.equal(a, b)


def test_ddim_step_eta1_has_ddpm_posterior_variance(alphas_cumprod):
    # With eta = 1 and consecutive timesteps, sigma^2 is DDPM's posterior variance beta-tilde_t.
    t = 500
    a, a_prev = alphas_cumprod[t].item(), alphas_cumprod[t - 1].item()
    x = torch.zeros(1, dtype=torch.float64)
    out, _ = ddim_step(x, x, a, a_prev, eta=1.0, noise=torch.ones(1, dtype=torch.float64))
    beta_t = 1 - a / a_prev
    assert out.item() ** 2 == pytest.approx((1 - a_prev) / (1 - a) * beta_t, rel=1e-10)


def test_clip_x0_clamps_prediction_and_keeps_direction_consistent():
    x_t = torch.tensor([3.0], dtype=torch.float64)
    eps = torch.tensor([0.0], dtype=torch.float64)
    x_prev, x0 = ddim_step(x_t, eps, 0.25, 0.5, eta=0.0, clip_x0=True)
    assert x0.item() == 1.0
    # eps re-derived from the clipped x0: (3 - 0.5 * 1) / sqrt(0.75)
    eps_clipped = 2.5 / math.sqrt(0.75)
    assert x_prev.item() == pytest.approx(math.sqrt(0.5) * 1.0 + math.sqrt(0.5) * eps_clipped)
    assert predict_x0(x_t, eps, 0.25).item() == pytest.approx(6.0)


# ----- full samplers


def test_ddim_sample_eta0_is_deterministic_and_eta1_uses_the_generator(alphas_cumprod):
    model = gaussian_oracle(alphas_cumprod, mu=0.3, s=0.5)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ts = ddim_timesteps(T, 20, "uniform")
    a = ddim_sample(model, x_T, alphas_cumprod, ts, eta=0.0)
    b = ddim_sample(model, x_T, alphas_cumprod, ts, eta=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    c = ddim_sample(model, x_T, alphas_cumprod, ts, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = ddim_sample(model, x_T, alphas_cumprod, ts, eta=1.0, generator=torch.Generator().manual_seed(1))
    e = ddim_sample(model, x_T, alphas_cumprod, ts, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c, d) and not torch.equal(c, e)


@pytest.mark.parametrize("steps", [1, 10])
def test_ddim_sample_last_step_returns_x0_prediction(alphas_cumprod, steps):
    targets, x_T = two_targets()
    out = ddim_sample(target_oracle(alphas_cumprod, targets), x_T, alphas_cumprod, ddim_timesteps(T, steps))
    torch.testing.assert_close(out, targets, rtol=0, atol=1e-9)


def test_ddim_eta0_with_oracle_follows_the_exact_gaussian_flow(alphas_cumprod):
    # For N(mu, s^2) data the probability-flow ODE is affine: x_0 = mu + s * (x_T - sqrt(a_T) mu) / std(x_T).
    mu, s = 0.3, 0.5
    x_T = torch.randn(1000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_T = alphas_cumprod[-1]
    exact = mu + s * (x_T - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    out = ddim_sample(gaussian_oracle(alphas_cumprod, mu, s), x_T, alphas_cumprod, ddim_timesteps(T, T, "trailing"))
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-2)


def test_ddim_eta1_with_oracle_recovers_the_gaussian_data_distribution(alphas_cumprod):
    mu, s = 0.3, 0.5
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20_000, 1, 1, 1, generator=g, dtype=torch.float64)
    ts = ddim_timesteps(T, T, "uniform")
    out = ddim_sample(gaussian_oracle(alphas_cumprod, mu, s), x_T, alphas_cumprod, ts, eta=1.0, generator=g)
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(s, rel=0.03)


def test_ddim_encode_then_decode_round_trips(alphas_cumprod):
    model = gaussian_oracle(alphas_cumprod, mu=0.2, s=0.6)
    x0 = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    ts = ddim_timesteps(T, T, "uniform")  # the ODE's discretisation error is first order in the step
    latent = ddim_encode(model, x0, alphas_cumprod, ts)
    assert (latent - x0).abs().mean() > 0.3  # it really moved to the noisy end
    back = ddim_sample(model, latent, alphas_cumprod, ts, eta=0.0)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-2)


def test_per_sample_generators_make_noise_independent_of_batching():
    like = torch.zeros(1)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = randn((3, 2, 2), gens, like)
    alone = randn((1, 2, 2), [torch.Generator().manual_seed(1)], like)
    assert torch.equal(batch[1], alone[0])
    with pytest.raises(ValueError, match="one per sample"):
        randn((2, 2), gens, like)


# ----- complexity, step size and loss


def _single_dot() -> torch.Tensor:
    x = torch.zeros(1, 3, 2, 2)
    x[:, :, 0, 1] = 1.0
    return x


def test_design_complexity_hand_values():
    c = compute_complexity(_single_dot(), "design")
    assert c.shape == (1, 3, 3, 3)  # the design's 2x2 kernel with padding 1 grows the map by one pixel
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, math.sqrt(2)], [0.0, 0.0, 0.0]]) / math.sqrt(12)
    for ch in range(3):
        torch.testing.assert_close(c[0, ch], expected, rtol=0, atol=1e-6)


def test_design_complexity_is_normalised_over_the_whole_batch():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    c = compute_complexity(x, "design")
    assert torch.linalg.vector_norm(c).item() == pytest.approx(1.0, abs=1e-6)
    # ... which is why a sample's value depends on the rest of its batch.
    assert not torch.allclose(compute_complexity(x[:1], "design"), c[:1])
    with pytest.raises(ValueError, match="3 channels"):
        compute_complexity(torch.rand(2, 1, 8, 8), "design")


def test_scaled_complexity_hand_values_and_normalisation():
    c = compute_complexity(_single_dot(), "scaled")
    assert c.shape == (1, 3, 2, 2)
    for ch in range(3):
        torch.testing.assert_close(c[0, ch], torch.tensor([[2.0, 2.0], [0.0, 0.0]]))
    assert complexity_score(_single_dot(), "scaled").item() == pytest.approx(0.5)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_scaled_complexity_any_channels_mean_one_batch_independent(channels):
    x = torch.rand(4, channels, 9, 7, generator=torch.Generator().manual_seed(channels))
    c = compute_complexity(x, "scaled")
    assert c.shape == x.shape
    torch.testing.assert_close(c.mean(dim=(1, 2, 3)), torch.ones(4))
    torch.testing.assert_close(compute_complexity(x[2:3], "scaled"), c[2:3])
    assert compute_complexity(torch.zeros(1, channels, 4, 4), "scaled").abs().max() == 0


def test_complexity_rejects_unknown_mode():
    with pytest.raises(ValueError, match="allowed: design, scaled"):
        compute_complexity(torch.rand(1, 3, 4, 4), "sobel")  # type: ignore[arg-type]


def test_adaptive_step_size_clamps():
    c = torch.tensor([0.0, 0.01, 1.0, 100.0])
    dt = adaptive_step_size(c, base_step_size=10.0, min_step=2.0, max_step=50.0)
    assert dt.tolist() == [50.0, 50.0, 10.0, 2.0]
    with pytest.raises(ValueError, match="min_step"):
        adaptive_step_size(c, 1.0, min_step=5.0, max_step=1.0)


def test_modified_loss_equals_mse_when_lambda_is_zero():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    for mode in ("design", "scaled"):
        c = compute_complexity(torch.rand(4, 3, 8, 8, generator=g), mode)
        torch.testing.assert_close(modified_loss(pred, true, c, lambda_reg=0.0), F.mse_loss(pred, true))


def test_modified_loss_hand_value():
    pred = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])
    true = torch.zeros_like(pred)
    c = torch.tensor([[[[2.0, 0.5], [1.0, 1.0]]]])
    # mse = (1 + 4) / 4 = 1.25; complexity term = (2*1 + 0.5*2) / 4 = 0.75
    assert modified_loss(pred, true, c, lambda_reg=0.1).item() == pytest.approx(1.25 + 0.075)
    se, ct = loss_terms(pred, true, c)
    assert se.tolist() == [1.25] and ct.tolist() == [0.75]


def test_modified_loss_design_mode_interpolates_and_gradients_flow():
    x0 = torch.rand(2, 3, 8, 8)
    c = compute_complexity(x0, "design")
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = modified_loss(pred, torch.randn(2, 3, 8, 8), c, lambda_reg=0.1)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_design_mode_complexity_term_is_negligible_and_scaled_is_not():
    # The design's normalisation makes its loss term ~1000x smaller than the MSE on a CIFAR-sized batch.
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(128, 3, 32, 32, generator=g) * 2 - 1
    pred, true = torch.randn(128, 3, 32, 32, generator=g), torch.randn(128, 3, 32, 32, generator=g)
    _, design_term = loss_terms(pred, true, compute_complexity(x0, "design"))
    _, scaled_term = loss_terms(pred, true, compute_complexity(x0, "scaled"))
    assert design_term.mean() < 1e-2 * scaled_term.mean()
    assert scaled_term.mean().item() == pytest.approx((pred - true).abs().mean().item(), rel=0.1)


# ----- the training objective


class RecordingConv(torch.nn.Module):
    """A deterministic eps-model (one 3x3 convolution, t ignored) that remembers the x_t it was given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(x_t.detach().clone())
        return self.conv(x_t)


def training_batch(b: int = 4, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    t = torch.randint(0, T, (b,), generator=g)
    return x0, t, torch.randn(b, 3, size, size, generator=g)


@pytest.mark.parametrize("mode", ["scaled", "design"])
def test_training_losses_are_the_design_loss_per_sample(alphas_cumprod, mode):
    model = RecordingConv()
    x0, t, noise = training_batch()
    out = training_losses(model, x0, t, noise, alphas_cumprod, lambda_reg=0.3, complexity_mode=mode)
    a = alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDIM eq. 4, written out
    torch.testing.assert_close(model.seen[0], x_t)
    with torch.no_grad():
        eps = model.conv(x_t)
    mse = (eps - noise).square().mean(dim=(1, 2, 3))
    se, ct = loss_terms(eps, noise, compute_complexity(x0, mode))
    assert set(out) == {"loss", "mse", "complexity_term"} and all(v.shape == (4,) for v in out.values())
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["complexity_term"], ct)
    torch.testing.assert_close(out["loss"], se + 0.3 * ct)
    torch.testing.assert_close(out["loss"].mean(), modified_loss(eps, noise, compute_complexity(x0, mode), 0.3))


def test_training_losses_with_lambda_zero_are_ddpms_and_gradients_reach_the_model(alphas_cumprod):
    model = RecordingConv()
    x0, t, noise = training_batch()
    out = training_losses(model, x0, t, noise, alphas_cumprod, lambda_reg=0.0)
    torch.testing.assert_close(out["loss"], out["mse"], rtol=0, atol=0)
    out["loss"].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_training_losses_of_a_sample_do_not_depend_on_its_batch(alphas_cumprod):
    model = RecordingConv()
    x0, t, noise = training_batch()
    batch = training_losses(model, x0, t, noise, alphas_cumprod, complexity_mode="scaled")
    alone = training_losses(model, x0[2:3], t[2:3], noise[2:3], alphas_cumprod, complexity_mode="scaled")
    for key in batch:
        torch.testing.assert_close(alone[key][0], batch[key][2])


@pytest.mark.parametrize("mode", ["scaled", "design"])
def test_training_losses_under_autocast_compute_the_loss_in_float32(alphas_cumprod, mode):
    # The network runs in bfloat16 under the caller's autocast; the complexity map (a convolution in design
    # mode) and the loss must not: they match the float32 computation from the bfloat16 prediction exactly.
    model = RecordingConv()
    x0, t, noise = training_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_losses(model, x0, t, noise, alphas_cumprod, complexity_mode=mode)
        eps_bf16 = model.conv(model.seen[0])
    assert eps_bf16.dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in out.values())
    se, ct = loss_terms(eps_bf16.float(), noise, compute_complexity(x0, mode))
    torch.testing.assert_close(out["mse"], se, rtol=0, atol=0)
    torch.testing.assert_close(out["complexity_term"], ct, rtol=0, atol=0)


# ----- adaptive sampler


def test_adaptive_with_fixed_stride_equals_linspace_ddim(alphas_cumprod):
    model = gaussian_oracle(alphas_cumprod, mu=0.1, s=0.7)
    x_T = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, nfe = adaptive_ddim_sample(model, x_T, alphas_cumprod, base_step_size=1.0, min_step=111, max_step=111)
    ref = ddim_sample(model, x_T, alphas_cumprod, ddim_timesteps(T, 10, "linspace"))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert nfe.tolist() == [10] * 6


def test_adaptive_samples_finish_independently(alphas_cumprod):
    # Sample 0's x0 prediction is flat (complexity 0: max stride), sample 1's a checkerboard (min stride).
    targets, x_T = two_targets()
    calls: list[int] = []
    model = target_oracle(alphas_cumprod, targets, calls)
    out, nfe = adaptive_ddim_sample(
        model, x_T, alphas_cumprod, base_step_size=10.0, min_step=100, max_step=250, complexity_mode="scaled"
    )
    # flat: 999, 749, 499, 249, 0 -> 5 calls; checkerboard: 999, 899, ..., 99, 0 -> 11 calls
    assert nfe.tolist() == [5, 11]
    assert calls == [2] * 5 + [1] * 6, "one batched call per iteration, only for unfinished samples"
    torch.testing.assert_close(out, targets, rtol=0, atol=1e-9)


def test_adaptive_stochastic_sample_is_independent_of_its_batch(alphas_cumprod):
    model = gaussian_oracle(alphas_cumprod, mu=0.0, s=0.5)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(base_step_size=0.2, min_step=20, max_step=200, eta=1.0, complexity_mode="scaled")
    out, nfe = adaptive_ddim_sample(
        model, x_T, alphas_cumprod, generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw
    )
    alone, nfe1 = adaptive_ddim_sample(
        model, x_T[1:2], alphas_cumprod, generator=[torch.Generator().manual_seed(1)], **kw
    )
    torch.testing.assert_close(alone[0], out[1], rtol=0, atol=1e-12)
    assert nfe1.item() == nfe[1].item()
    assert bool((nfe >= 5).all() and (nfe <= 50).all())


# ---------------------------------------------------------------------------------------------------------
# The latent space: encode, reconstruct, interpolate (DDIM sections 5.3 and 5.4)
# ---------------------------------------------------------------------------------------------------------


def gaussian_toy(seed: int = 0):
    """Data x_0 ~ N(m, s^2 I) on 3 x 8 x 8 'images', and its optimal eps-model in closed form: x_t is Gaussian,
    so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a). The DDIM ODE then maps x_0 to
    x_t = sqrt(a) m + sqrt(a s^2 + 1 - a) (x_0 - m) / s exactly: the true latent is known too."""
    ac = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000)).double()
    mean, s = torch.linspace(-0.5, 0.5, 192, dtype=torch.float64).view(1, 3, 8, 8), 0.3

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * s**2 + 1 - a)

    x_0 = mean + s * torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def true_latent(t: int) -> torch.Tensor:
        a = ac[t]
        return a.sqrt() * mean + (a * s**2 + 1 - a).sqrt() * (x_0 - mean) / s

    return eps_model, x_0, ac, true_latent


def test_reconstruction_error_falls_at_the_rate_of_a_first_order_ode_solver():
    """DDIM is a first-order solver of the probability-flow ODE: the encode/decode error in x shrinks like
    1 / steps, so the per-dimension squared error like 1 / steps^2 (a factor 4 per doubling); the latent
    converges to the exact ODE solution at the first order too."""
    eps_model, x_0, ac, true_latent = gaussian_toy()
    mse, latent_error = {}, {}
    for steps in (20, 40, 80, 160, 320):
        timesteps = ddim_timesteps(1000, steps, "uniform")
        reconstruction, latent = ddim_reconstruct(eps_model, x_0, ac, timesteps)
        mse[steps] = ((reconstruction - x_0) ** 2).mean().item()
        latent_error[steps] = (latent - true_latent(int(timesteps[0]))).abs().max().item()
    for coarse, fine in ((80, 160), (160, 320)):
        assert 3.5 < mse[coarse] / mse[fine] < 4.5, mse
        assert 1.8 < latent_error[coarse] / latent_error[fine] < 2.2, latent_error
    slope = np.polyfit(np.log(list(mse)), np.log(list(mse.values())), 1)[0]
    assert -2.3 < slope < -1.7, mse
    assert mse[320] < 1e-4


def test_ddim_reconstruct_inverts_ddim_sample_of_its_own_latent():
    """Decoding is ddim_sample at eta 0 on the encoded latent; with the exact latent as input, the decoder
    gives the data back up to the same first-order error."""
    eps_model, x_0, ac, true_latent = gaussian_toy(seed=1)
    timesteps = ddim_timesteps(1000, 200, "uniform")
    decoded = ddim_sample(eps_model, true_latent(int(timesteps[0])), ac, timesteps)
    assert ((decoded - x_0) ** 2).mean() < 1e-3


def test_slerp_keeps_the_norm_of_gaussian_latents_where_lerp_does_not():
    g = torch.Generator().manual_seed(0)
    z_0, z_1 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    norm = math.sqrt(3 * 32 * 32)
    for t in np.linspace(0, 1, 9):
        assert torch.allclose(slerp(z_0, z_1, t).flatten(1).norm(dim=1) / norm, torch.ones(4), atol=0.03)
    torch.testing.assert_close(slerp(z_0, z_1, 0.0), z_0)
    torch.testing.assert_close(slerp(z_0, z_1, 1.0), z_1)
    midpoint = lerp(z_0, z_1, 0.5).flatten(1).norm(dim=1) / norm
    assert torch.allclose(midpoint, torch.full((4,), math.sqrt(0.5)), atol=0.03)
    torch.testing.assert_close(slerp(z_0, 2 * z_0, 0.25), lerp(z_0, 2 * z_0, 0.25))  # parallel: the straight line


@pytest.mark.parametrize("steps", [3, 30])
def test_ddim_reads_the_schedule_back_once_per_call_not_per_step(steps, monkeypatch):
    """On a GPU each host read of a device tensor waits for it: DDIM reads its timesteps and their alphas once."""
    alphas = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000))
    timesteps = ddim_timesteps(1000, steps, "uniform")
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
    x = torch.randn(2, 3, 4, 4)
    ddim_sample(lambda x, t: torch.zeros_like(x), x, alphas, timesteps)
    ddim_encode(lambda x, t: torch.zeros_like(x), x, alphas, timesteps)
    assert reads == ["tolist"] * 4
