"""U-Net size and training-step speed: parameter counts and forward+backward time. Prints one JSON object.

python benchmarks/unet_speed.py                      # the 64-channel CIFAR-10 model, batch 128, 32x32
python benchmarks/unet_speed.py --ch 128 --batch 32 --device cuda --autocast bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from models.unet import UNet, UNetConfig


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_train_step(
    model: UNet, batch: int, device: torch.device, autocast: str, channels_last: bool, warmup: int, iters: int
) -> list[float]:
    """Seconds per forward + backward (MSE against random noise, as in training), one per iteration."""
    size = model.config.image_size
    x = torch.randn(batch, model.config.in_channels, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn_like(x)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(model(x, t).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ch", type=int, default=64, help="base channels of the timed model (64 or 128)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UNet(UNetConfig.ddpm_cifar10(args.ch)).to(device).train()
    times = time_train_step(model, args.batch, device, args.autocast, args.channels_last, args.warmup, args.iters)
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "params_cifar10_ch128": parameter_count(UNet(UNetConfig.ddpm_cifar10(128))),
                "params_cifar10_ch64": parameter_count(UNet(UNetConfig.ddpm_cifar10(64))),
                "timed_config": {
                    "ch": args.ch,
                    "batch": args.batch,
                    "image_size": 32,
                    "device": args.device,
                    "autocast": args.autocast,
                    "channels_last": args.channels_last,
                },
                "fwd_bwd_seconds_median": round(median, 3),
                "fwd_bwd_seconds_all": [round(s, 3) for s in times],
                "images_per_second": round(args.batch / median, 1),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
