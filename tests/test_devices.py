"""Device and precision resolution: TF32 only for mixed precision, float64 schedules never sent to MPS."""

from __future__ import annotations

import pytest
import torch

from tasks.common.devices import on_device, set_precision


@pytest.fixture(autouse=True)
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [
        ("fp32", "cuda", (None, "fp32", False)),
        ("bf16", "cuda", (torch.bfloat16, "bf16", True)),
        ("fp16", "cuda", (torch.float16, "fp16", True)),
        ("auto", "cpu", (None, "fp32", False)),
        ("bf16", "cpu", (torch.bfloat16, "bf16", True)),
    ],
)
def test_tf32_only_for_mixed_precision_and_the_effective_name(precision, device, expected):
    torch.backends.cuda.matmul.allow_tf32 = not expected[2]  # start from the opposite setting
    torch.backends.cudnn.allow_tf32 = not expected[2]
    dtype, name = set_precision(precision, torch.device(device))
    assert (dtype, name) == expected[:2]
    assert torch.backends.cuda.matmul.allow_tf32 is expected[2]
    assert torch.backends.cudnn.allow_tf32 is expected[2], "fp32 must switch off cuDNN's default TF32"


def test_a_float64_schedule_reaches_mps_as_float32(monkeypatch):
    # No MPS here: stand in for its refusal of float64 tensors, and record what would have been moved.
    moved = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, torch.device) and target.type == "mps":
            if self.dtype == torch.float64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
            moved.append(self.dtype)
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    schedule = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    assert on_device(schedule, torch.device("mps")).dtype == torch.float32 and moved == [torch.float32]
    assert on_device(schedule, torch.device("cpu")).dtype == torch.float64, "float64 stays where it exists"
