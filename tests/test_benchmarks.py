"""The GPU benchmark runs its small version on the CPU: every section, ours beside diffusers, a sane report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

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
