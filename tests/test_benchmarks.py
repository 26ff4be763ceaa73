"""The GPU benchmark runs its small version on the CPU: every section, ours beside diffusers, a sane report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_the_gpu_benchmark_measures_every_section_on_the_cpu(tmp_path, capsys):
    import gpu

    report = gpu.main(["--size", "tiny", "--json", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    bare = {(r["model"], r["channels_last"]) for r in rows if r["what"] == "train/bare"}
    assert bare == {(m, cl) for m in ("ours", "diffusers") for cl in (False, True)}
    assert {r["variant"] for r in rows if r["what"] == "train/full"} == {
        "as configured",
        "batch already on the device",
        "channels-first",
    }
    assert {(r["steps"], r["eta"]) for r in rows if r["what"] == "sample/ours"} == {(2, 0.0), (3, 0.0), (3, 1.0)}
    assert all(r["images_per_s"] > 0 for r in rows if "images_per_s" in r)
    fid = next(r for r in rows if r["what"] == "fid")
    assert fid["abs_diff"] < 1e-6 * max(1.0, fid["fid"])  # the eigenvalue form is scipy's sqrtm, to rounding
    assert "| train/full | variant=as configured" in capsys.readouterr().out
