"""Device and precision choices shared by the stages (``auto`` resolves here, nowhere else)."""

from __future__ import annotations

from typing import Literal

import torch

from tasks.common.errors import UserError

Device = Literal["auto", "cuda", "mps", "cpu"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]


class DeviceError(UserError):
    """The configured device is not available here."""


def pick_device(choice: Device, local_rank: int = 0) -> torch.device:
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


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto`` is bf16 on CUDA GPUs that support it, else fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def set_precision(precision: Precision, device: torch.device) -> tuple[torch.dtype | None, str]:
    """Resolve ``precision`` on ``device``: returns the autocast dtype and the effective name to record.

    TF32 matmuls and convolutions (10-bit mantissas on Ampere and newer GPUs) are switched on only for the
    mixed-precision modes, where the layers autocast leaves in float32 do not need more; ``fp32`` means
    full float32 everywhere, so TF32 is switched off (cuDNN allows it by default).
    """
    amp_dtype = autocast_dtype(precision, device)
    tf32 = amp_dtype is not None
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype]
    return amp_dtype, name


def on_device(schedule: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 schedule moved to ``device``: as float32 on Apple's MPS, which has no float64 tensors.

    The cast happens before the move (MPS refuses to receive float64). Elsewhere the schedule stays in
    float64, and the math casts it where it meets the data.
    """
    if device.type == "mps" and schedule.dtype == torch.float64:
        schedule = schedule.float()
    return schedule.to(device)
