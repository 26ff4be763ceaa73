"""The GPU benchmark runs its small version on the CPU: every section, ours beside diffusers, a sane report."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_the_gpu_benchmark_measures_every_section_on_the_cpu(tmp_path, capsys):
    import gpu
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~20 s; with 2 threads on 2 busy cores, 2-3 minutes (threads waiting for each other)
    try:
        report = gpu.main(["--size", "tiny", "--json", str(tmp_path / "report.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    rows, batches = report["rows"], gpu.SIZES["tiny"].train_batches
    bare = {(r["model"], r["channels_last"], r["batch"]) for r in rows if r["what"] == "train/bare"}
    for model in ("ours", "diffusers"):  # both formats at the largest batch, one (the faster) at the others
        assert {(cl, b) for m, cl, b in bare if m == model and b == max(batches)} == {
            (False, max(batches)),
            (True, max(batches)),
        }
        assert len({cl for m, cl, b in bare if m == model and b != max(batches)}) == 1
    full = [r for r in rows if r["what"] == "train/full"]
    assert sorted((r["step"], r["data"], r["batch"]) for r in full) == sorted(
        itertools.product(("eager", "graphed"), ("DataLoader", "device"), batches)
    )
    assert all(r["captured"] is False for r in full if r["step"] == "graphed")  # the CPU runs the graph's work
    assert all(r["matmul_fraction"] > 0 for r in rows if r["what"].startswith("train/"))
    ddim = {(r["network"], r["steps"]): r for r in rows if r["what"] == "sample/ddim"}
    assert set(ddim) == set(itertools.product(("eager", "graphed"), gpu.SIZES["tiny"].sample_steps))
    for steps in gpu.SIZES["tiny"].sample_steps:  # uncaptured on the CPU: the same work, the same images
        assert ddim["graphed", steps]["max_abs_diff"] == 0.0 and ddim["graphed", steps]["agrees"]
    assert [r["steps"] for r in rows if r["what"] == "sample/bare"] == [3]
    assert all(r["images_per_s"] > 0 for r in rows if "images_per_s" in r)
    fid = next(r for r in rows if r["what"] == "fid")
    assert fid["abs_diff"] < 1e-6 * max(1.0, fid["fid"])  # the eigenvalue form is scipy's sqrtm, to rounding
    whole = report["targets"][0]
    assert whole["value"] == max(r["steps_per_s"] for r in full if r["batch"] == max(batches))
    assert report["targets"][1]["value"] is None  # nothing compiled in the tiny run
    out = capsys.readouterr().out
    assert "| train/full | step=graphed, data=device" in out
    assert out.rstrip().splitlines()[-5] == "targets (read off the rows above):"
    twice = gpu.main(["--report", str(tmp_path / "report.json"), str(tmp_path / "report.json")])  # measures nothing
    assert [r["run"] for r in twice["rows"]] == [1] * len(rows) + [2] * len(rows)
    assert twice["targets"][0]["value"] == whole["value"] and "run=1" in twice["targets"][0]["row"]


def test_the_gpu_benchmarks_targets_are_read_off_the_rows():
    import gpu

    def full(step, batch, steps_per_s):
        return {
            "what": "train/full",
            "step": step,
            "data": "device",
            "batch": batch,
            "steps_per_s": steps_per_s,
            "matmul_fraction": steps_per_s / 500,
        }

    rows = [
        full("eager", 128, 20.0),
        full("graphed", 128, 50.0),
        full("graphed", 16, 100.0),
        {"what": "train/bare", "model": "diffusers", "compile": False, "batch": 128, "steps_per_s": 45.0},
        {"what": "train/bare", "model": "diffusers", "compile": True, "batch": 128, "steps_per_s": 40.0},
        {"what": "train/bare", "model": "diffusers", "compile": True, "batch": 16, "steps_per_s": 99.0},
        {"what": "sample/ddim", "network": "eager", "steps": 100, "batch": 1000, "images_per_s": 80.0},
    ]
    whole, over, small, ddpm = gpu.targets(rows, small=16, large=128)
    assert (whole["value"], whole["met"], whole["stretch_met"], whole["matmul_fraction"]) == (50.0, True, True, 0.1)
    assert "step=graphed" in whole["row"]
    assert (over["value"], over["met"], over["theirs_steps_per_s"]) == (1.25, False, 40.0)
    assert (small["value"], small["goal"], small["met"]) == (100.0, 120, False)
    assert ddpm["value"] == pytest.approx(800_000 / 50 / 3600) and ddpm["met"] is None
    assert gpu.targets([], small=16, large=128)[0] == {
        "target": "whole step, batch 128",
        "value": None,
        "unit": "steps/s",
        "goal": 40,
        "met": None,
        "stretch": 50,
        "stretch_met": None,
    }
    text = gpu.targets_text(gpu.targets(rows, small=16, large=128))
    assert "- whole step, batch 128: 50.00 steps/s (step=graphed, data=device, 10.0% of matmul peak)" in text
    assert "1.25 x (theirs: 40.00 steps/s" in text and "goal >= 1.3: NOT met" in text
    assert "- DDPM's 800,000 steps at that batch-128 rate: 4.44 hours" in text


def test_the_gpu_benchmark_goes_on_after_a_failed_measurement(monkeypatch):
    import gpu

    def capture_fails(_bench):
        yield {"what": "train/full", "step": "eager"}
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setitem(gpu.SECTIONS, "full", capture_fails)
    assert list(gpu.section_rows(None, "full")) == [
        {"what": "train/full", "step": "eager"},
        {"what": "error", "section": "full", "error": "RuntimeError: operation not permitted when stream is capturing"},
    ]
    assert gpu.attempt(lambda: 1 / 0, step="graphed", batch=16) == {
        "what": "error",
        "step": "graphed",
        "batch": 16,
        "error": "ZeroDivisionError: division by zero",
    }


@pytest.mark.slow
def test_the_reproducibility_benchmark_finds_same_thread_reruns_bit_identical(tmp_path):
    import reproducibility

    from tasks.common.config import profile_params

    params = profile_params("demo", Path(__file__).resolve().parents[1] / "profiles").model_dump(mode="json")
    params["data"].update(count=64)
    params["model"].update(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8])
    params["train"].update(batch_size=16, log_every=2, checkpoint_every=6)
    params["sample"].update(steps=3, batch_size=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    report = reproducibility.main(["--params", str(tmp_path / "params.yaml"), "--steps", "6", "--images", "4"])
    assert [r["threads"] for r in report["train"]] == [2, 2, 1] == [r["threads"] for r in report["sample"]]
    assert report["train"][1]["identical"] and report["train"][1]["max_abs_diff"] == 0.0  # same threads: bit for bit
    assert report["sample"][1]["identical"] and report["sample"][1]["pixels_differing"] == 0.0
    assert report["train"][2]["max_abs_diff"] < 1e-3 * report["train"][2]["max_abs_weight"]
