"""Device and precision choices shared by the stages (``auto`` resolves here, nowhere else)."""

from __future__ import annotations

import torch

from tasks.errors import UserError


class DeviceError(UserError):
    """The configured device is not available here."""


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``: cuda, then mps, then cpu. An explicit choice that is not available is an error."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        choice = "mps" if torch.backends.mps.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device=cuda but no CUDA GPU is visible: use device=auto or cpu")
        return torch.device("cuda", local_rank)
    if choice == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device=mps but MPS is not available: use device=auto or cpu")
    return torch.device(choice)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto`` is bf16 on CUDA GPUs that support it, else fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
