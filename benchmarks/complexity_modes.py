"""How the design's complexity measure behaves in its two modes. Prints one JSON object.

    python benchmarks/complexity_modes.py [--batch 128] [--size 32]

Images: Gaussian noise blurred to three levels of detail (sharp, medium, smooth), scaled to [-1, 1], so the
batch spans simple and busy images. For each mode it reports the complexity map's shape and mean, the loss's
complexity term next to its MSE (pred and true noise independent N(0, 1)), and the adaptive step sizes
``clamp(base / score, min_step, max_step)`` with base 10, min 5, max 100 (training-timestep units).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from models.diffusion import adaptive_step_size, complexity_score, compute_complexity, loss_terms


def test_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(batch, 3, size, size, generator=generator)
    out = []
    for i, sigma in enumerate([0.0, 1.5, 4.0] * (batch // 3 + 1)):
        if i == batch:
            break
        img = noise[i : i + 1]
        if sigma > 0:
            radius = int(3 * sigma)
            k = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
            k = (k / k.sum()).reshape(1, 1, 1, -1).repeat(3, 1, 1, 1)
            img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="reflect"), k, groups=3)
            img = F.conv2d(F.pad(img, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3), groups=3)
        out.append(img / img.abs().amax())
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x0 = test_images(args.batch, args.size, g)
    pred, true = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    report = {"batch": args.batch, "size": args.size}
    levels = ["sharp", "medium", "smooth"]
    for mode in ("design", "scaled"):
        c = compute_complexity(x0, mode)
        squared_error, complexity_term = loss_terms(pred, true, c)
        score = complexity_score(x0, mode)
        steps = adaptive_step_size(score, base_step_size=10.0, min_step=5.0, max_step=100.0)
        report[mode] = {
            "map_shape": list(c.shape),
            "map_mean": round(c.mean().item(), 6),
            "mse": round(squared_error.mean().item(), 4),
            "complexity_term": round(complexity_term.mean().item(), 6),
            "term_over_mse": round((complexity_term.mean() / squared_error.mean()).item(), 6),
            "score_by_detail_level": {name: round(score[i::3].mean().item(), 6) for i, name in enumerate(levels)},
            "step_by_detail_level": {name: round(steps[i::3].mean().item(), 2) for i, name in enumerate(levels)},
            "fraction_of_steps_at_max": round((steps == 100.0).float().mean().item(), 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
