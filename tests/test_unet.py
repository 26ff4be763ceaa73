"""The U-Net: shapes, the paper's parameter counts, config round trip, and the fast paths."""

from __future__ import annotations

import io

import pytest
import torch

from models.unet import UNet, UNetConfig, timestep_embedding

TINY = UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)


def tiny_model(seed: int = 0, config: UNetConfig = TINY) -> UNet:
    """A model with every weight random: DDPM's initialisation zeroes the output, which would hide bugs."""
    torch.manual_seed(seed)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(batch: int = 2, config: UNetConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("ch", "expected"), [(128, 35_746_307), (64, 8_952_067)])
def test_ddpm_cifar10_parameter_counts(ch, expected):
    model = UNet(UNetConfig.ddpm_cifar10(ch))
    assert n_params(model) == expected
    if ch == 128:
        assert abs(expected - 35.7e6) / 35.7e6 < 0.01  # the DDPM paper's 35.7M


def test_output_shape_and_out_channels():
    x, t = inputs(3)
    assert tiny_model()(x, t).shape == x.shape
    config = UNetConfig(**{**TINY.to_dict(), "in_channels": 1, "out_channels": 2})
    x1, t1 = inputs(2, config)
    assert tiny_model(config=config)(x1, t1).shape == (2, 2, 16, 16)


def test_non_square_channel_counts_and_three_levels():
    config = UNetConfig(image_size=32, ch=32, ch_mult=(1, 2, 3), num_res_blocks=2, attn_resolutions=(8, 32))
    x, t = inputs(1, config)
    assert tiny_model(config=config)(x, t).shape == x.shape


def test_eval_mode_is_deterministic_and_dropout_acts_in_train_mode():
    model = tiny_model().eval()
    x, t = inputs()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


def test_timestep_changes_the_output():
    model = tiny_model().eval()
    x, _ = inputs()
    out_a = model(x, torch.tensor([10, 10]))
    out_b = model(x, torch.tensor([900, 900]))
    assert (out_a - out_b).abs().mean() > 1e-3
    # Per-sample timesteps: sample 0 at t=10 must match its output in a batch at uniform t=10.
    mixed = model(x, torch.tensor([10, 900]))
    torch.testing.assert_close(mixed[0], out_a[0])
    torch.testing.assert_close(mixed[1], out_b[1])


def test_every_parameter_gets_a_gradient():
    model = tiny_model()
    x, t = inputs()
    model(x, t).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_ddpm_initialisation_starts_every_block_as_the_identity_and_the_output_at_zero():
    torch.manual_seed(0)
    model = UNet(UNetConfig.ddpm_cifar10(ch=32))
    x, t = inputs(2, model.config)
    assert torch.equal(model(x, t), torch.zeros_like(x))
    zero = [n for n, p in model.named_parameters() if n.endswith("weight") and not p.any()]
    assert set(zero) == {
        *(n for n, _ in model.named_parameters() if n.endswith(("conv2.weight", "proj_out.weight"))),
        "conv_out.weight",
    }
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith("bias"))
    # Glorot uniform: U(-b, b) with b = sqrt(6 / (fan_in + fan_out)); q, k and v each on their own.
    w = model.down[1].blocks[0].conv1.weight  # [64, 32, 3, 3]
    bound = (6 / (32 * 9 + 64 * 9)) ** 0.5
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    q = model.mid_attn.qkv.weight[:64]  # [64, 64, 1, 1]
    assert q.abs().max() <= (6 / 128) ** 0.5 and q.abs().max() > 0.9 * (6 / 128) ** 0.5


def test_rejects_a_bad_timestep_shape():
    x, _ = inputs()
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        tiny_model()(x, torch.tensor(5))


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = 10000.0 ** (-torch.arange(4) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(freqs), torch.cos(freqs)]))


def test_config_round_trips_through_a_weights_only_checkpoint():
    model = tiny_model()
    buf = io.BytesIO()
    torch.save({"model_config": TINY.to_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    config = UNetConfig.from_dict(ckpt["model_config"])
    assert config == TINY
    restored = UNet(config)
    restored.load_state_dict(ckpt["model"])
    x, t = inputs()
    torch.testing.assert_close(restored.eval()(x, t), model.eval()(x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({**TINY.to_dict(), "channels": 3})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 30, "ch_mult": (1, 2, 2, 2)}, "not divisible by 8"),
        ({"image_size": 32, "ch_mult": (1, 2), "attn_resolutions": (8,)}, r"\[8\] never occur"),
        ({"ch": 48}, "not divisible by num_groups=32"),
        ({"ch": 64, "num_groups": 24}, "not divisible by num_groups=24"),
        ({"ch_mult": (1, 1.5)}, "integers"),
        ({"dropout": 1.0}, "dropout"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
    ],
)
def test_invalid_configs_raise_with_a_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**TINY.to_dict(), **kwargs})


def test_channels_last_matches_contiguous():
    model = tiny_model().eval()
    x, t = inputs()
    ref = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_runs_and_stays_close():
    model = tiny_model().eval()
    x, t = inputs()
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = tiny_model().eval()
    x, t = inputs()
    ref = model(x, t)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x, t), ref, rtol=1e-4, atol=1e-4)
