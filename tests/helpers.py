"""Plain helpers and constants that several test modules use (fixtures live in conftest.py). Test modules import
this one (`from helpers import ...`), never each other: pytest puts tests/ on sys.path (rootdir conftest, no
__init__.py), so `import helpers` works from any test module, run alone or with the rest."""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import numpy as np
    import torch

# The session's throwaway Prefect home. conftest.py puts it in PREFECT_HOME before anything imports prefect.
PREFECT_HOME = tempfile.mkdtemp(prefix="ddim-test-prefect-")

# A diffusers UNet2DModel with DDPM's settings, as small as the tests' micro U-Net (ch 32, ch_mult 1,2, one res
# block, attention at 8x8, 16 px).
SMALL = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
    "norm_num_groups": 32,
}


def cli_env() -> dict[str, str]:
    """Environment for running `ddim` in a subprocess: no API URL, so each command starts its temporary server,
    on the session's throwaway Prefect home (one home for all: a new one costs each command ~6 s of database
    set-up)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = PREFECT_HOME
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_run(tmp_path: Path, mlflow_uri: str, **train) -> Path:
    """A params file for a tiny model on 128 shapes at 16 px, with the dataset prepared."""
    from tasks.common.config import load_params
    from tasks.prepare import build_dataset

    params = {
        "paths": {
            "raw": str(tmp_path / "raw"),
            "prepared": str(tmp_path / "prepared"),
            "checkpoints": str(tmp_path / "ckpt"),
            "train": str(tmp_path / "out"),
        },
        "data": {"name": "s", "source": "shapes", "image_size": 16, "count": 128},
        "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.1},
        "train": {
            "steps": 30,
            "batch_size": 16,
            "lr": 1e-3,
            "warmup": 5,
            "log_every": 5,
            "sample_every": 0,
            "sample_steps": 4,
            "checkpoint_every": 10,
            "num_workers": 0,
            "deterministic": True,
            **train,
        },
        "tracking": {"uri": mlflow_uri, "experiment": "test"},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    loaded = load_params(path)
    if not (tmp_path / "prepared" / "s").exists():
        build_dataset(loaded.data, loaded.paths)
    return path


def diffusers_to_ddpm_names(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename diffusers' keys to the original DDPM layout, written independently of models/weights.py."""
    rules = [
        (r"^time_embedding\.linear_1\.", "temb.dense.0."),
        (r"^time_embedding\.linear_2\.", "temb.dense.1."),
        (r"^conv_norm_out\.", "norm_out."),
        (r"^mid_block\.resnets\.0\.", "mid.block_1."),
        (r"^mid_block\.resnets\.1\.", "mid.block_2."),
        (r"^mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"\.time_emb_proj\.", ".temb_proj."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.group_norm\.", ".norm."),
        (r"\.to_([qkv])\.", r".\1."),
        (r"\.to_out\.0\.", ".proj_out."),
    ]
    out = {}
    for key, tensor in state.items():
        up = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(.*)$", key)
        if up:  # diffusers numbers the way up from the lowest resolution; DDPM by resolution level
            level, kind, rest = levels - 1 - int(up.group(1)), up.group(2), up.group(3)
            key = {"resnets": f"up.{level}.block.{rest}", "attentions": f"up.{level}.attn.{rest}"}.get(
                kind, f"up.{level}.upsample.{rest.removeprefix('0.')}"
            )
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if re.search(r"\.attn(_1)?\.\d*\.?(q|k|v|proj_out)\.weight$", key) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # DDPM's attention projections are 1x1 convolutions
        out[key] = tensor
    return out


def read_images(folder: Path, n: int) -> np.ndarray:
    """The first ``n`` images a sample stage wrote into ``folder``, as one uint8 array."""
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / "images" / f"{i:06d}.png")) for i in range(n)])


HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__")


def refuse_host_reads(monkeypatch, allowed: set[int]) -> None:
    """Make every host read of a tensor (``bool``, ``item``, ``tolist``, ``float``, ``int``) fail, but of the
    tensors whose ids are ``allowed``: on a GPU each such read waits for the device."""
    import torch

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def read_back(tensor, *args):
            assert id(tensor) in allowed, f"Tensor.{name} of a {tuple(tensor.shape)} tensor inside the step"
            return original(tensor, *args)

        return read_back

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
