"""Other implementations' weights of DDPM's U-Net, mapped onto :class:`models.unet.UNet`.

Two layouts are understood, both pure functions of state dicts (no files here):

- ``"ddpm"``: the original DDPM / pytorch_diffusion naming, which ermongroup/ddim loads for CIFAR-10, CelebA
  and LSUN: ``temb.dense.{0,1}``, ``down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}``,
  ``down.{i}.attn.{j}.{norm,q,k,v,proj_out}`` (1x1 convolutions), ``down.{i}.downsample.conv``,
  ``mid.{block_1,attn_1,block_2}``, ``up.{i}.block.{j}``, ``up.{i}.attn.{j}``, ``up.{i}.upsample.conv``,
  ``norm_out``, ``conv_out``. Its ``up.{i}`` is numbered by resolution level (0 = full size), ours from the
  lowest resolution up.
- ``"diffusers"``: diffusers' ``UNet2DModel`` with DDPM's settings (google/ddpm-cifar10-32 and its kin):
  ``time_embedding.linear_{1,2}``, ``down_blocks.{i}.resnets.{j}`` (``time_emb_proj``, ``conv_shortcut``),
  ``down_blocks.{i}.attentions.{j}`` (``group_norm``, ``to_q/to_k/to_v`` as Linear ``[C, C]``,
  ``to_out.0``), ``down_blocks.{i}.downsamplers.0.conv``, ``mid_block.{resnets,attentions}``,
  ``up_blocks.{k}`` (numbered like ours), ``conv_norm_out``, ``conv_out``.

Every tensor must map: a missing, unexpected or misshapen one is a :class:`WeightsError` naming it.
:func:`export_state_dict` maps the other way, for ``ddim export-model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch

from models.unet import UNet, UNetConfig

Layout = Literal["ddpm", "diffusers"]

# Our residual-block and attention parts, and their names in each layout.
_RES_PARTS = {
    "ddpm": {"norm1": "norm1", "conv1": "conv1", "temb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
             "shortcut": "nin_shortcut"},
    "diffusers": {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "shortcut": "conv_shortcut"},
}  # fmt: skip
_ATTN_PARTS = {
    "ddpm": {"norm": "norm", "qkv": ("q", "k", "v"), "proj_out": "proj_out"},
    "diffusers": {"norm": "group_norm", "qkv": ("to_q", "to_k", "to_v"), "proj_out": "to_out.0"},
}

# diffusers' UNet2DModel settings that make it DDPM's network; any other value is a different network.
DIFFUSERS_DDPM_SETTINGS = {
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "center_input_sample": False,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attn_norm_num_groups": None,
    "add_attention": True,
}


class WeightsError(ValueError):
    """A state dict does not hold the network it should."""


def _blocks(config: UNetConfig, layout: Layout) -> Iterator[tuple[str, str, str]]:
    """``(our module, their module, kind)`` for every block of the network; kind is param, res or attn."""
    d = layout == "diffusers"
    levels = len(config.ch_mult)
    yield "temb.0", "time_embedding.linear_1" if d else "temb.dense.0", "param"
    yield "temb.2", "time_embedding.linear_2" if d else "temb.dense.1", "param"
    yield "conv_in", "conv_in", "param"
    for i, res in enumerate(config.resolutions):
        theirs = f"down_blocks.{i}" if d else f"down.{i}"
        for j in range(config.num_res_blocks):
            yield f"down.{i}.blocks.{j}", f"{theirs}.resnets.{j}" if d else f"{theirs}.block.{j}", "res"
            if res in config.attn_resolutions:
                yield f"down.{i}.attn.{j}", f"{theirs}.attentions.{j}" if d else f"{theirs}.attn.{j}", "attn"
        if i != levels - 1:
            yield f"downsample.{i}.conv", f"{theirs}.downsamplers.0.conv" if d else f"{theirs}.downsample.conv", "param"
    yield "mid_block1", "mid_block.resnets.0" if d else "mid.block_1", "res"
    yield "mid_attn", "mid_block.attentions.0" if d else "mid.attn_1", "attn"
    yield "mid_block2", "mid_block.resnets.1" if d else "mid.block_2", "res"
    for k in range(levels):
        i = levels - 1 - k  # our up.k is the resolution level i
        theirs = f"up_blocks.{k}" if d else f"up.{i}"
        for j in range(config.num_res_blocks + 1):
            yield f"up.{k}.blocks.{j}", f"{theirs}.resnets.{j}" if d else f"{theirs}.block.{j}", "res"
            if config.resolutions[i] in config.attn_resolutions:
                yield f"up.{k}.attn.{j}", f"{theirs}.attentions.{j}" if d else f"{theirs}.attn.{j}", "attn"
        if i != 0:
            yield f"upsample.{k}.conv", f"{theirs}.upsamplers.0.conv" if d else f"{theirs}.upsample.conv", "param"
    yield "norm_out", "conv_norm_out" if d else "norm_out", "param"
    yield "conv_out", "conv_out", "param"


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _sources(config: UNetConfig, layout: Layout) -> dict[str, tuple[str, ...]]:
    """For each of our parameter names, the foreign names it is made of (q, k and v for the fused qkv)."""
    out: dict[str, tuple[str, ...]] = {}
    for ours, theirs, kind in _blocks(config, layout):
        parts: dict[str, Any] = {"": ""} if kind == "param" else (_RES_PARTS if kind == "res" else _ATTN_PARTS)[layout]
        for mine, foreign in parts.items():
            foreign_names = foreign if isinstance(foreign, tuple) else (foreign,)
            for suffix in ("weight", "bias"):
                out[_join(ours, mine, suffix)] = tuple(_join(theirs, f, suffix) for f in foreign_names)
    return out


def _first(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert_state_dict(state: dict[str, torch.Tensor], config: UNetConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """``state`` (a state dict in ``layout``) as a state dict of ``UNet(config)``; raise if anything is off."""
    template = UNet(config).state_dict()
    sources = {k: v for k, v in _sources(config, layout).items() if k in template}  # shortcuts exist only where needed
    wanted = {n for names in sources.values() for n in names}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        found = (("missing", missing), ("unexpected", unexpected))
        problems = [f"{what} {_first(names)}" for what, names in found if names]
        raise WeightsError(f"the weights are not a {layout}-layout U-Net of this config: {'; '.join(problems)}")
    out, misshapen = {}, []
    for ours, names in sources.items():
        tensor = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
        if tensor.numel() != template[ours].numel():
            misshapen.append(f"{'+'.join(names)} {tuple(tensor.shape)} for {ours} {tuple(template[ours].shape)}")
            continue
        out[ours] = tensor.reshape(template[ours].shape)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
    if misshapen:
        raise WeightsError(f"misshapen tensors: {_first(misshapen, 3)}")
    return out


def export_state_dict(state: dict[str, torch.Tensor], config: UNetConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """``state`` (a state dict of ``UNet(config)``) in ``layout``: the inverse of :func:`convert_state_dict`, bit
    for bit (the fused qkv split into q, k and v; diffusers' attention projections as Linear ``[C, C]``). Every
    tensor is a contiguous copy of its own, as safetensors wants."""
    template = UNet(config).state_dict()
    if set(state) != set(template):
        missing, unexpected = sorted(set(template) - set(state)), sorted(set(state) - set(template))
        raise WeightsError(
            f"not a state dict of this U-Net config: missing {_first(missing)}; unexpected {_first(unexpected)}"
        )
    sources = {k: v for k, v in _sources(config, layout).items() if k in template}
    out = {}
    for ours, names in sources.items():
        for name, tensor in zip(names, state[ours].chunk(len(names)), strict=True):
            if layout == "diffusers" and ".attentions." in name and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]  # a 1x1 convolution of ours is a Linear layer of theirs
            out[name] = tensor.detach().cpu().contiguous().clone()
    return out


def _unless_same(out_channels: int, in_channels: int) -> int | None:
    return None if out_channels == in_channels else out_channels  # UNetConfig's way to say "as many as in"


def unet_config_from_diffusers(config: dict[str, Any]) -> UNetConfig:
    """The UNetConfig of a diffusers ``UNet2DModel`` config.json, if it describes DDPM's network."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise WeightsError(f"a diffusers {config['_class_name']}, not a UNet2DModel")
    wrong = {k: config[k] for k, v in DIFFUSERS_DDPM_SETTINGS.items() if k in config and config[k] != v}
    if config.get("attention_head_dim") is not None:
        wrong["attention_head_dim"] = config["attention_head_dim"]  # None: one head, as DDPM
    if wrong:
        raise WeightsError(f"not DDPM's U-Net: {wrong}; DDPM's settings are {DIFFUSERS_DDPM_SETTINGS}")
    widths = list(config["block_out_channels"])
    down = list(config["down_block_types"])
    size = config["sample_size"]
    attn = tuple(size // 2**i for i, kind in enumerate(down) if kind.startswith("Attn"))
    expected_up = [kind.replace("Down", "Up") for kind in reversed(down)]
    if list(config["up_block_types"]) != expected_up:
        raise WeightsError(f"up_block_types {config['up_block_types']} do not mirror {down}: not DDPM's U-Net")
    try:
        return UNetConfig(
            image_size=size,
            in_channels=config.get("in_channels", 3),
            out_channels=_unless_same(config.get("out_channels", 3), config.get("in_channels", 3)),
            ch=widths[0],
            ch_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=config.get("layers_per_block", 2),
            attn_resolutions=attn,
            dropout=config.get("dropout", 0.0),
            num_groups=config.get("norm_num_groups", 32),
        )
    except ValueError as e:
        raise WeightsError(str(e)) from None


def diffusers_config(config: UNetConfig) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` config of the same network as ``config`` (the inverse of
    ``unet_config_from_diffusers``): what a side-by-side comparison with diffusers builds."""
    down = ["AttnDownBlock2D" if size in config.attn_resolutions else "DownBlock2D" for size in config.resolutions]
    return {
        **DIFFUSERS_DDPM_SETTINGS,
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels or config.in_channels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "down_block_types": down,
        "up_block_types": [kind.replace("Down", "Up") for kind in reversed(down)],
        "attention_head_dim": None,
        "dropout": config.dropout,
        "norm_num_groups": config.num_groups,
    }


def ddpm_config_from_state_dict(state: dict[str, torch.Tensor], image_size: int, dropout: float = 0.0) -> UNetConfig:
    """The UNetConfig of an original-layout DDPM state dict (which does not record its image size)."""
    try:
        ch, in_channels = state["conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down."))
        blocks = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down.0.block."))
        widths = [state[f"down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    except (KeyError, ValueError, IndexError) as e:
        raise WeightsError(f"not an original-layout DDPM U-Net ({e.__class__.__name__}: {e})") from None
    attn = tuple(image_size // 2**i for i in range(levels) if f"down.{i}.attn.0.q.weight" in state)
    try:
        return UNetConfig(
            image_size=image_size,
            in_channels=int(in_channels),
            out_channels=_unless_same(int(state["conv_out.weight"].shape[0]), int(in_channels)),
            ch=int(ch),
            ch_mult=tuple(int(w) // int(ch) for w in widths),
            num_res_blocks=blocks,
            attn_resolutions=attn,
            dropout=dropout,
        )
    except ValueError as e:
        raise WeightsError(str(e)) from None
