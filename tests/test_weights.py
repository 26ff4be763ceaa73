"""Our U-Net is numerically DDPM's: against diffusers' UNet2DModel with google/ddpm-cifar10-32's config, and the
original DDPM checkpoint layout, each mapped onto ours by models/weights.py."""

from __future__ import annotations

import pytest
import torch
from helpers import diffusers_to_ddpm_names

from models.unet import UNet, UNetConfig
from models.weights import (
    WeightsError,
    convert_state_dict,
    ddpm_config_from_state_dict,
    diffusers_config,
    export_state_dict,
    unet_config_from_diffusers,
)

# google/ddpm-cifar10-32's config.json (the settings that matter; the rest are UNet2DModel's defaults).
DDPM_CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "attention_head_dim": None,
}


@pytest.fixture(scope="module")
def diffusers_ddpm():
    """diffusers' DDPM CIFAR-10 network with random weights everywhere (its default init zeroes nothing)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**DDPM_CIFAR10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig.ddpm_cifar10(),
        UNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
    ],
)
def test_diffusers_config_is_the_inverse_of_reading_one(config):
    from diffusers import UNet2DModel

    settings = diffusers_config(config)
    assert unet_config_from_diffusers(settings) == config
    theirs = UNet2DModel(**settings)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in UNet(config).parameters())


def test_diffusers_config_of_ddpm_cifar10_is_googles():
    settings = diffusers_config(UNetConfig.ddpm_cifar10())
    assert {k: settings[k] for k in DDPM_CIFAR10} == DDPM_CIFAR10


def eps_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g, dtype=dtype), torch.tensor([0, 417, 999])


def ours_from(state: dict, layout: str, config: UNetConfig, dtype: torch.dtype) -> UNet:
    model = UNet(config)
    model.load_state_dict(convert_state_dict(state, config, layout))
    return model.to(dtype).eval()


def test_the_diffusers_config_is_ddpm_cifar10(diffusers_ddpm):
    config = unet_config_from_diffusers(dict(diffusers_ddpm.config))
    assert config == UNetConfig(**{**UNetConfig.ddpm_cifar10().to_dict(), "dropout": 0.0})


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_same_eps_as_diffusers_unet2dmodel(diffusers_ddpm, dtype, tolerance):
    config = unet_config_from_diffusers(dict(diffusers_ddpm.config))
    ours = ours_from(diffusers_ddpm.state_dict(), "diffusers", config, dtype)
    theirs = diffusers_ddpm.to(dtype)
    x, t = eps_inputs(dtype)
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert expected.abs().mean() > 0.1, "a network that outputs ~0 would compare trivially"
    assert (got - expected).abs().max().item() < tolerance


def test_original_ddpm_layout_gives_the_same_eps(diffusers_ddpm):
    state = diffusers_to_ddpm_names(diffusers_ddpm.state_dict(), levels=4)
    assert {"up.3.upsample.conv.weight", "down.1.attn.0.q.weight", "mid.block_1.conv1.bias"} <= set(state)
    config = ddpm_config_from_state_dict(state, image_size=32, dropout=0.1)
    assert config == UNetConfig.ddpm_cifar10()
    ours = ours_from(state, "ddpm", config, torch.float64)
    x, t = eps_inputs(torch.float64)
    with torch.no_grad():
        assert (ours(x, t) - diffusers_ddpm.to(torch.float64)(x, t).sample).abs().max().item() < 1e-12


def test_every_key_must_map(diffusers_ddpm):
    config = unet_config_from_diffusers(dict(diffusers_ddpm.config))
    state = dict(diffusers_ddpm.state_dict())
    extra = {**state, "extra.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"unexpected extra\.weight"):
        convert_state_dict(extra, config, "diffusers")
    del state["mid_block.attentions.0.to_k.bias"]
    with pytest.raises(WeightsError, match=r"missing mid_block\.attentions\.0\.to_k\.bias"):
        convert_state_dict(state, config, "diffusers")
    state = dict(diffusers_ddpm.state_dict())
    state["conv_in.weight"] = torch.zeros(128, 3, 5, 5)
    with pytest.raises(WeightsError, match=r"misshapen tensors: conv_in\.weight \(128, 3, 5, 5\) for conv_in\.weight"):
        convert_state_dict(state, config, "diffusers")


def test_export_is_the_inverse_of_convert_in_both_layouts(diffusers_ddpm):
    """diffusers' own state dict comes back exactly (names, shapes, bits), and so does ours through either layout."""
    config = unet_config_from_diffusers(dict(diffusers_ddpm.config))
    theirs = diffusers_ddpm.state_dict()
    ours = convert_state_dict(theirs, config, "diffusers")
    exported = export_state_dict(ours, config, "diffusers")
    assert exported.keys() == theirs.keys()
    assert all(exported[k].shape == theirs[k].shape and torch.equal(exported[k], theirs[k]) for k in theirs)
    back = convert_state_dict(export_state_dict(ours, config, "ddpm"), config, "ddpm")
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    del ours["conv_in.bias"]
    with pytest.raises(WeightsError, match=r"missing conv_in\.bias"):
        export_state_dict(ours, config, "diffusers")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"downsample_padding": 1}, "downsample_padding"),
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
        ({"attention_head_dim": 8}, "attention_head_dim"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "do not mirror"),
    ],
)
def test_a_diffusers_config_that_is_not_ddpms_network_is_refused(change, message):
    with pytest.raises(WeightsError, match=message):
        unet_config_from_diffusers({**DDPM_CIFAR10, **change})
