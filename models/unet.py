"""The U-Net noise predictor eps_theta(x_t, t).

The design document's U-Net (a contracting path, an expansive path, and the contracting path's feature maps
concatenated onto the expansive path at every level) in the form of DDPM (Ho et al. 2020, appendix B):

- a sinusoidal embedding of the timestep, followed by a two-layer MLP;
- residual blocks: GroupNorm -> SiLU -> conv3x3, the time embedding added, GroupNorm -> SiLU -> dropout ->
  conv3x3, with a 1x1 convolution on the shortcut when the channel count changes;
- single-head self-attention at the resolutions named in ``attn_resolutions``;
- stride-2 convolutions to go down a level (padded as TensorFlow's 'SAME': right and bottom only),
  nearest-neighbour upsampling + conv3x3 to go up one;
- DDPM's initialisation (:meth:`UNet.reset_parameters`).

Numerically it is DDPM's network: with the same weights it gives the eps of diffusers' ``UNet2DModel`` for
google/ddpm-cifar10-32 (``tests/test_unet.py``), and ``models/weights.py`` maps that model's and the
original DDPM checkpoints' weights onto it. The network knows nothing about the noise schedule: ``t`` is
only an integer (or real) index that is embedded. With the DDPM CIFAR-10 config
(``UNetConfig.ddpm_cifar10()``) it has 35.7M parameters, the paper's count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Everything that determines the network's shape. Saved inside every checkpoint.

    The defaults are DDPM's CIFAR-10 network (35.7M parameters). Each field's ``help`` says what it means;
    the pipeline's ``model`` params section is made from these fields (all but the first three, which come
    from the data), so the help is also the comment beside each key in ``params.yaml``.
    """

    image_size: int = field(default=32, metadata={"help": "height = width of the input, in pixels"})
    in_channels: int = field(default=3, metadata={"help": "channels of the input image (3 for RGB)"})
    out_channels: int | None = field(
        default=None, metadata={"help": "channels of the predicted noise; null: in_channels"}
    )
    ch: int = field(default=128, metadata={"help": "base channel count: level i has ch * ch_mult[i] channels"})
    ch_mult: tuple[int, ...] = field(
        default=(1, 2, 2, 2),
        metadata={"help": "channel multiplier per resolution level; the image halves between levels"},
    )
    num_res_blocks: int = field(
        default=2, metadata={"help": "residual blocks per level down (the expansive path has one more)"}
    )
    attn_resolutions: tuple[int, ...] = field(
        default=(16,), metadata={"help": "feature-map sizes (px) where self-attention follows each residual block"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout probability inside residual blocks"})
    num_groups: int = field(default=32, metadata={"help": "GroupNorm groups: every channel count must divide by it"})

    def __post_init__(self) -> None:
        # Accept lists (from YAML/JSON/checkpoints) but store tuples so the config stays hashable and frozen.
        for name in ("ch_mult", "attn_resolutions"):
            values = tuple(getattr(self, name))
            if any(isinstance(v, bool) or float(v) != int(v) for v in values):
                raise ValueError(f"UNetConfig.{name} must be integers, got {list(values)}")
            object.__setattr__(self, name, tuple(int(v) for v in values))
        self.validate()

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, from the input resolution down."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field to change if the network cannot be built from this config."""
        positive = {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "ch": self.ch,
            "num_res_blocks": self.num_res_blocks,
            "num_groups": self.num_groups,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"UNetConfig.out_channels must be positive or None, got {self.out_channels}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"UNetConfig.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"UNetConfig.image_size={self.image_size} is not divisible by {factor}, the downsampling of "
                f"{len(self.ch_mult)} levels (ch_mult={list(self.ch_mult)}): use an image size that is a "
                f"multiple of {factor}, or fewer levels in ch_mult"
            )
        missing = sorted(set(self.attn_resolutions) - set(self.resolutions))
        if missing:
            raise ValueError(
                f"UNetConfig.attn_resolutions {missing} never occur: with image_size={self.image_size} and "
                f"{len(self.ch_mult)} levels the feature maps are {list(self.resolutions)} pixels; "
                f"pick attention resolutions from those"
            )
        widths = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
        bad = [w for w in widths if w % self.num_groups]
        if bad:
            raise ValueError(
                f"UNetConfig: channel counts {bad} (ch={self.ch} x ch_mult={list(self.ch_mult)}) are not "
                f"divisible by num_groups={self.num_groups} GroupNorm groups: make ch a multiple of "
                f"{self.num_groups}, or lower num_groups"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of builtins (lists, ints, floats), safe for ``torch.load(weights_only=True)``."""
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    @classmethod
    def ddpm_cifar10(cls, ch: int = 128) -> UNetConfig:
        """DDPM's CIFAR-10 network: 35.7M parameters at ch=128; the design's "64-dimension" model is ch=64."""
        return cls(image_size=32, ch=ch, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, as in DDPM / "Attention is all you need".

    Args:
        t: shape ``[B]``, integer or real timesteps.
        dim: embedding width (even).
    Returns:
        ``[B, dim]`` float32: ``[sin(t * f_0..f_{h-1}), cos(t * f_0..f_{h-1})]`` with
        ``f_k = max_period ** (-k / (h - 1))``, ``h = dim // 2``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(dim=1)
        # [B, HW, C] each; SDPA scales by 1/sqrt(C) and picks a fused kernel where one exists.
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """A stride-2 conv3x3 with TensorFlow's 'SAME' padding, as DDPM's network was trained: on an even input
    that pads one pixel on the right and bottom only (PyTorch's ``padding=1`` would pad all four sides)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level of either path: residual blocks, each optionally followed by attention."""

    def __init__(self, blocks: list[ResBlock], attn: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in ``x_t``.

    ``forward(x [B, C, H, W], t [B]) -> [B, out_channels, H, W]``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        temb_ch = 4 * c.ch
        g = c.num_groups
        self.temb = nn.Sequential(nn.Linear(c.ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)

        def attn_at(res: int, channels: int) -> nn.Module:
            return AttnBlock(channels, g) if res in c.attn_resolutions else nn.Identity()

        # Contracting path. `skips` records the channel count of every feature map pushed for concatenation.
        skips = [c.ch]
        width = c.ch
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, (res, mult) in enumerate(zip(c.resolutions, c.ch_mult, strict=True)):
            blocks, attn = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(width, c.ch * mult, temb_ch, c.dropout, g))
                width = c.ch * mult
                attn.append(attn_at(res, width))
                skips.append(width)
            self.down.append(Level(blocks, attn))
            is_last = level == len(c.ch_mult) - 1
            self.downsample.append(nn.Identity() if is_last else Downsample(width))
            if not is_last:
                skips.append(width)

        self.mid_block1 = ResBlock(width, width, temb_ch, c.dropout, g)
        self.mid_attn = AttnBlock(width, g)
        self.mid_block2 = ResBlock(width, width, temb_ch, c.dropout, g)

        # Expansive path: num_res_blocks + 1 blocks per level, each consuming one skip by concatenation.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(c.ch_mult))):
            res, mult = c.resolutions[level], c.ch_mult[level]
            blocks, attn = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(width + skips.pop(), c.ch * mult, temb_ch, c.dropout, g))
                width = c.ch * mult
                attn.append(attn_at(res, width))
            self.up.append(Level(blocks, attn))
            self.upsample.append(Upsample(width) if level != 0 else nn.Identity())
        assert not skips, "every skip connection must be consumed"

        self.norm_out = _norm(width, g)
        self.conv_out = nn.Conv2d(width, c.output_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DDPM's initialisation: every convolution and linear layer Glorot-uniform (TF's
        ``variance_scaling(1, "fan_avg", "uniform")``; q, k and v each on its own) with zero biases, and zeros
        for the layers that end a residual branch (each block's second conv, the attention output
        projection) and for the output conv, so every block starts as the identity and the network as 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():  # after the loop above, which also reaches these layers
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
            if isinstance(module, AttnBlock):
                for weight in module.qkv.weight.chunk(3):
                    nn.init.xavier_uniform_(weight)
                nn.init.zeros_(module.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [B]={[x.shape[0]]}, got {list(t.shape)}")
        temb = self.temb(timestep_embedding(t, self.config.ch).to(x.dtype))

        h = self.conv_in(x)
        hs = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(h, temb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)

        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            h = up(h)

        return self.conv_out(F.silu(self.norm_out(h)))
