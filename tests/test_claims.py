"""The claims study (benchmarks/claims.py): its matched NFE, its tables' exact intervals, and a micro study that
runs, resumes and adds only the cells it lacks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import t as student_t

from models.diffusion import ddim_timesteps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import claims


def nfe(steps: int, spacing: str) -> int:
    return len(ddim_timesteps(1000, steps, spacing))


def test_matched_steps_gives_the_ddim_step_count_of_the_nearest_nfe():
    assert [claims.matched_steps(n, 1000, "uniform") for n in (1.0, 10.0, 37.2, 99.8)] == [1, 10, 37, 100]
    assert claims.matched_steps(10.5, 1000, "uniform") == 10  # a tie: the smaller count
    assert nfe(50, "quad") == 49  # quad drops a repeated timestep: 50 steps are 49 evaluations
    assert nfe(claims.matched_steps(49.0, 1000, "quad"), "quad") == 49
    for target in (12.0, 59.3, 125.1):
        steps = claims.matched_steps(target, 1000, "quad")
        best = min(abs(nfe(s, "quad") - target) for s in range(1, 300))
        assert abs(nfe(steps, "quad") - target) == best


def half_width(values: list[float]) -> float:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return student_t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))


def study_rows() -> pd.DataFrame:
    """Two settings x three seeds, each with the demo cell, an adaptive cell and its matched DDIM cell."""
    rows = []
    for setting, shift in (("plain", 0.0), ("scaled", 1.0)):
        for seed in range(3):
            run = {"setting": setting, "train.seed": seed, "model": f"{setting}-seed{seed}", "train_seconds": 10.0}
            run |= {"final_mse": 0.03 + 0.001 * seed, "final_loss": 0.04, "heldout_mse": 0.05 - 0.01 * shift}
            common = {"eta": 1.0, "spacing": "quad", "num_samples": 500, "reference_count": 1000, "seconds": 1.0}
            demo = {"cell": "ddim-50", "sampler": "ddim", "steps": 50, "base_step": None, "nfe": 49.0}
            adaptive = {"cell": "adaptive-6", "sampler": "adaptive", "steps": None, "base_step": 6.0}
            matched = {"cell": "ddim-matched-6", "sampler": "ddim", "steps": 58 + seed, "base_step": None}
            rows.append({**run, **common, **demo, "fid": 80.0 + seed * seed + shift})
            rows.append({**run, **common, **adaptive, "nfe": 57.0 + seed, "fid": 90.0 + seed + shift})
            rows.append({**run, **common, **matched, "nfe": 57.0 + seed, "fid": 85.0 + shift})
    return pd.DataFrame(rows)


def test_the_loss_table_holds_each_settings_interval_and_its_paired_difference_to_plain():
    table = claims.loss_table(study_rows()).set_index("setting")
    fids = [80.0, 81.0, 84.0]
    assert table.loc["plain", "fid"] == f"{sum(fids) / 3:.2f} ± {half_width(fids):.2f}"
    assert table.loc["scaled", "fid"] == f"{sum(fids) / 3 + 1:.2f} ± {half_width(fids):.2f}"
    assert table.loc["scaled", "fid - baseline"] == "1.00 ± 0.00"  # the same +1 at every seed
    assert table.loc["scaled", "heldout_mse - baseline"] == "-0.01000 ± 0.00000"
    mses = [0.030, 0.031, 0.032]
    assert table.loc["plain", "final_mse"] == f"{0.031:.5f} ± {half_width(mses):.5f}"
    assert list(table["n"]) == [3, 3]
    assert "final_loss - baseline" not in table  # each setting minimises its own loss: nothing to pair


def test_the_adaptive_table_pairs_each_model_with_ddim_at_its_nfe_and_pools_seeds_not_models():
    rows = study_rows()
    rows.loc[(rows["setting"] == "scaled") & (rows["cell"] == "adaptive-6"), "fid"] += 2.0  # scaled: +2 more
    table = {r["setting"]: r for r in claims.adaptive_table(rows)}
    assert list(table) == ["plain", "scaled", "all (seed means)"]
    plain, scaled, pooled = [5.0, 6.0, 7.0], [7.0, 8.0, 9.0], [6.0, 7.0, 8.0]  # adaptive - ddim, seeds 0, 1, 2
    assert table["plain"]["difference"] == f"{6.0:.2f} ± {half_width(plain):.2f}"
    assert table["scaled"]["difference"] == f"{8.0:.2f} ± {half_width(scaled):.2f}"
    assert table["all (seed means)"]["difference"] == f"{7.0:.2f} ± {half_width(pooled):.2f}"  # n = 3 seeds, not 6
    assert {r["seeds"] for r in table.values()} == {3} and table["plain"]["ddim_steps"] == "58 59 60"
    assert table["plain"]["adaptive_nfe"] == table["plain"]["ddim_nfe"] == f"58.00 ± {half_width([57, 58, 59]):.2f}"


def test_the_curve_table_groups_a_matched_cell_over_its_models_steps():
    table = claims.curve_table(study_rows())
    assert sorted(zip(table["cell"], table["setting"], strict=True)) == sorted(
        (c, s) for c in ("adaptive-6", "ddim-50", "ddim-matched-6") for s in ("plain", "scaled")
    )
    assert set(table["n"]) == {3}


@pytest.mark.slow
def test_a_micro_study_runs_resumes_and_adds_only_the_cells_it_lacks(tmp_path, capsys):
    out = tmp_path / "claims"
    common = ["--size", "tiny", "--out", str(out), "--jobs", "2"]
    claims.main([*common, "--settings", "plain", "scaled", "--seeds", "2", "--adaptive", "--solvers"])
    text = (out / "claims.md").read_text()
    assert "4 runs (plain: 2, scaled: 2, design: 0)" in text and text in capsys.readouterr().out
    rows = pd.read_csv(out / "rows.csv")
    assert sorted(rows["model"]) == ["plain-seed0", "plain-seed1", "scaled-seed0", "scaled-seed1"]
    assert set(rows["cell"]) == {"ddim-5"} and set(rows["num_samples"]) == {8}
    assert rows["heldout_mse"].between(0, 2).all() and rows["fid"].gt(0).all()
    first = out / "runs" / "plain-seed0"
    kept = {p: p.stat().st_mtime_ns for p in [first / "train.json", first / "heldout.json", *first.glob("cells/*")]}

    claims.main([*common, "--settings", "plain", "--seeds", "1", "--adaptive", "6"])  # three more cells, one run
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert sorted(p.name for p in (first / "cells").glob("*")) == [
        "adaptive-6.json",
        "ddim-5.json",
        "ddim-matched-6.json",
        "dpm-solver++-order2-steps20.json",
    ]
    solver = json.loads((first / "cells" / "dpm-solver++-order2-steps20.json").read_text())
    assert (solver["sampler"], solver["order"], solver["nfe"], solver["eta"]) == ("dpm-solver++", 2, 20, None)
    assert not (out / "runs" / "plain-seed1" / "cells" / "adaptive-6.json").exists()
    matched = json.loads((first / "cells" / "ddim-matched-6.json").read_text())
    adaptive = json.loads((first / "cells" / "adaptive-6.json").read_text())
    assert nfe(matched["steps"], "quad") == claims.matched_steps(adaptive["nfe"], 1000, "quad") and matched["nfe"] > 0
    assert "| 6 | plain | 1 |" in (out / "claims.md").read_text()  # the adaptive table: base 6, plain, one seed

    with pytest.raises(SystemExit, match="another --size"):
        claims.main(["--size", "demo", "--out", str(out), "--seeds", "1"])
    meta = json.loads((out / "study.json").read_text())
    (out / "study.json").write_text(json.dumps({**meta, "fingerprint": "0" * 16}))  # as if the profile had changed
    with pytest.raises(SystemExit, match="holds a study of other params"):
        claims.main([*common, "--seeds", "1"])


def test_a_worker_dies_with_the_study_even_when_the_study_is_killed(tmp_path):
    """The study's workers get SIGTERM from the kernel when their driver dies, SIGKILL included."""
    driver = (
        "import argparse, sys, time; sys.path.insert(0, 'benchmarks'); import claims\n"
        "claims.worker_command = lambda args, setting, seed: [sys.executable, '-c', 'import time; time.sleep(120)']\n"
        f"args = argparse.Namespace(out=__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "print(claims.launch(args, 'plain', 0, {}).pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=root, stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    assert Path(f"/proc/{worker}").exists()
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while Path(f"/proc/{worker}").exists() and time.time() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(worker, os.WNOHANG)  # not our child: a zombie would be reaped by init
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
