"""The sweep: a cell's in-pass FID is the FID of its images as PNG files; exact image counts; the same images
and FID from two processes as from one; the table, the plot and DDIM's Table 1 beside them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import read_images
from mlflow.tracking import MlflowClient
from PIL import Image

from tasks import reference, sweep, sweep_solver, sweep_table
from tasks.common.config import ConfigError, load_params
from tasks.common.fid import FeatureStats, fid_between, statistics
from tasks.common.grid import SweepError, solver_cell_name, solver_settings
from tasks.sweep_table import PAPER_FID, paper_fid

BIN = Path(sys.executable).parent


def with_sweep(params_file: Path, tmp_path: Path, **sweep) -> Path:
    """A copy of the trained model's params with a sweep section and its own sweep folder."""
    raw = yaml.safe_load(params_file.read_text())
    raw["paths"]["sweep"] = str(tmp_path / "sweep")
    raw["sweep"] = {"steps": [3], "eta": [0.0], "num_samples": 10, "batch_size": 4, **sweep}
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def test_running_sums_give_numpys_mean_and_covariance():
    feats = np.random.default_rng(0).normal(size=(300, 16)) * 3 + 1
    stats = FeatureStats(dims=16)
    for chunk in np.array_split(feats, 7):
        stats.add(torch.from_numpy(chunk))
    mu, sigma = stats.mean_and_covariance()
    ref_mu, ref_sigma = statistics(feats)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # Inception on the CPU
def test_a_cells_fid_is_the_fid_of_its_images_as_png_files(trained, tmp_path):
    params_file = with_sweep(trained, tmp_path, images=True)
    params = load_params(params_file)
    reference.run(params)
    cell = sweep.run(params, steps=3, eta=0.0)
    assert cell["num_samples"] == 10, "every requested image, though 10 is not a multiple of the batch size 4"
    images = tmp_path / "sweep" / "cells" / "steps3-eta0.0"
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 10
    from_files = fid_between([images, Path(params.paths.reference) / f"{params.data.name}.npz"], batch_size=4)
    assert cell["fid"] == pytest.approx(from_files["fid"], abs=1e-6)
    written = json.loads((tmp_path / "sweep" / "cells" / "steps3-eta0.0.json").read_text())
    assert written["fid"] == cell["fid"] and "seconds" not in written, "the run's time is MLflow's, not DVC's"

    # The same images as the sample stage draws for that config.
    from tasks import sample

    samples = tmp_path / "samples"
    sets = ["sample.steps=3", "sample.eta=0.0", "sample.spacing=quad", "sample.num_samples=10"]
    sample.run(load_params(params_file, [*sets, f"paths.samples={samples}"]))
    np.testing.assert_array_equal(read_images(samples, 10), np.stack([np.asarray(Image.open(p)) for p in pngs]))

    run = MlflowClient(tracking_uri=params.tracking.uri).get_run(cell["mlflow_run_id"])
    assert run.data.metrics["fid"] == pytest.approx(cell["fid"]) and run.data.params["sample.steps"] == "3"
    assert run.data.metrics["seconds"] == cell["seconds"] > 0


@pytest.mark.slow  # Inception on the CPU
def test_a_solver_cell_scores_the_images_the_sample_stage_draws_with_that_solver(trained, tmp_path):
    params_file = with_sweep(trained, tmp_path, images=True, solvers=["unipc-bh1-order3"])
    params = load_params(params_file)
    reference.run(params)
    cell = sweep_solver.run(params, solver="unipc-bh1-order3", steps=4)
    written = json.loads((tmp_path / "sweep" / "cells" / "unipc-bh1-order3-steps4.json").read_text())
    assert written == {k: cell[k] for k in written} and "eta" not in written, "DDIM's eta is no setting of UniPC"
    assert (written["sampler"], written["order"], written["variant"], written["nfe"]) == ("unipc", 3, "bh1", 4)

    from tasks import sample

    samples = tmp_path / "samples"
    sets = ["sample.sampler=unipc", "sample.order=3", "sample.variant=bh1", "sample.steps=4", "sample.spacing=quad"]
    sample.run(load_params(params_file, [*sets, "sample.num_samples=10", f"paths.samples={samples}"]))
    pngs = sorted((tmp_path / "sweep" / "cells" / "unipc-bh1-order3-steps4").glob("*.png"))
    np.testing.assert_array_equal(read_images(samples, 10), np.stack([np.asarray(Image.open(p)) for p in pngs]))
    run = MlflowClient(tracking_uri=params.tracking.uri).get_run(cell["mlflow_run_id"])
    assert run.info.run_name == "unipc-bh1-order3-4steps-quad" and run.data.params["sample.variant"] == "bh1"
    assert "sample.eta" not in run.data.params and run.data.metrics["fid"] == pytest.approx(cell["fid"])


@pytest.mark.parametrize(
    "solver", ["ddim", "dpm-solver++-order4", "dpm-solver++-bh2-order2", "unipc-order2", "unipc-bh3-order1", ""]
)
def test_a_solver_names_its_sampler_and_order_or_is_refused_with_the_forms_it_can_take(tmp_path, solver):
    assert solver_settings("dpm-solver++-order3") == {"sampler": "dpm-solver++", "order": 3}
    assert solver_settings("unipc-bh1-order1") == {"sampler": "unipc", "order": 1, "variant": "bh1"}
    with pytest.raises(SweepError, match=r"write dpm-solver\+\+-order<1-3> or unipc-<bh1\|bh2>-order<1-3>"):
        solver_settings(solver)
    with pytest.raises(SweepError):
        solver_cell_name(solver, 3)  # no file (a cell's record or its flow's lock) is named after a bad solver
    (tmp_path / "params.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"sweep\.solvers: .*write dpm-solver"):
        load_params(tmp_path / "params.yaml", [f"sweep.solvers=[unipc-bh2-order2,{solver or 'x'}]"])
    with pytest.raises(ConfigError, match="distinct"):
        load_params(tmp_path / "params.yaml", ["sweep.solvers=[unipc-bh2-order2,unipc-bh2-order2]"])


def test_the_table_reads_the_current_grid_and_puts_ddims_table_beside_it(tmp_path):
    params_file = tmp_path / "params.yaml"
    grid = {"steps": [10, 100], "eta": [0.0, 1.0], "solvers": ["unipc-bh2-order3"]}
    params_file.write_text(yaml.safe_dump({"paths": {"sweep": str(tmp_path / "sweep")}, "sweep": grid}))
    params = load_params(params_file)
    cells = tmp_path / "sweep" / "cells"
    cells.mkdir(parents=True)
    for steps, eta, fid in [(10, 0.0, 14.0), (100, 0.0, 4.5), (10, 1.0, 40.0), (100, 1.0, 6.0), (20, 0.0, 99.0)]:
        nfe = {10: 10, 20: 20, 100: 96}[steps]
        cell = {
            "steps": steps,
            "eta": eta,
            "spacing": "quad",
            "nfe": nfe,
            "fid": fid,
            "num_samples": 50_000,
        }
        (cells / f"steps{steps}-eta{eta}.json").write_text(json.dumps(cell))  # as cells before the solvers were
    for steps, fid in [(10, 5.0), (100, 4.0)]:
        cell = {"sampler": "unipc", "steps": steps, "spacing": "quad", "order": 3, "variant": "bh2", "fid": fid}
        (cells / f"unipc-bh2-order3-steps{steps}.json").write_text(json.dumps({**cell, "nfe": 96, "num_samples": 1}))
    (cells / "dpm-solver++-order2-steps10.json").write_text("{}")  # a solver no longer in the grid
    result = sweep_table.run(params)
    assert [(c["sampler"], c["steps"], c.get("eta")) for c in result["cells"]] == [
        ("ddim", 10, 0.0),
        ("ddim", 10, 1.0),
        ("ddim", 100, 0.0),
        ("ddim", 100, 1.0),
        ("unipc", 10, None),
        ("unipc", 100, None),
    ], "not the stale 20-step cell, nor the solver left out"
    by_cell = {(c["steps"], c.get("eta")): c for c in result["cells"]}
    assert by_cell[(100, 0.0)]["paper_fid"] == 4.16 and by_cell[(100, 0.0)]["difference"] == pytest.approx(0.34)
    assert (tmp_path / "sweep" / "table.csv").read_text().splitlines()[
        0
    ] == "sampler,steps,eta,order,variant,spacing,nfe,fid,paper_fid,difference,num_samples"
    markdown = (tmp_path / "sweep" / "table.md").read_text()
    assert "| ddim | 100 | 0.00 |  |  | quad | 96 | 4.50 | 4.16 | 0.34 | 50000 |" in markdown
    assert "| unipc | 100 |  | 3 | bh2 | quad | 96 | 4.00 |  |  | 1 |" in markdown, "no paper reports this cell"
    assert (tmp_path / "sweep" / "fid_vs_nfe.png").read_bytes().startswith(b"\x89PNG")


def test_ddims_table_applies_only_to_the_run_it_measured(tmp_path):
    cifar = tmp_path / "cifar.yaml"
    cifar.write_text("{}")  # the defaults: CIFAR-10's training set, 50,000 per cell, quad
    params = load_params(cifar)
    assert paper_fid(params, 100, 0.0, "quad") == 4.16 and paper_fid(params, 10, 0.2, "quad") == 14.04
    assert paper_fid(params, 100, 0.0, "uniform") is None, "DDIM's CIFAR-10 numbers are with quad spacing"
    assert paper_fid(load_params(cifar, ["sweep.num_samples=10000"]), 100, 0.0, "quad") is None
    assert paper_fid(load_params(cifar, ["data.source=shapes", "data.count=10"]), 100, 0.0, "quad") is None
    assert set(PAPER_FID) == {0.0, 0.2, 0.5, 1.0}


def torchrun(nproc: int, stage: str, result: Path, *args: str) -> dict:
    """Rank 0's result (the file ``result``) of ``python -m pipelines.ranks stage args`` as ``nproc`` ranks, each
    on one thread."""
    launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}"]
    command = [*launcher, "-m", "pipelines.ranks", stage, "--result", str(result), *args]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.fixture
def one_thread():
    """This process on one thread, as each torchrun rank is (float rounding in convolutions depends on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.integration
def test_two_processes_draw_the_same_images_and_get_the_same_fid_as_one(trained, tmp_path, one_thread):
    # One image per batch and one thread per process: float rounding in convolutions depends on the batch's
    # shape and the thread count, which one process and two would otherwise split differently.
    from tasks import sample

    params_file = with_sweep(trained, tmp_path, eta=[1.0], batch_size=1)
    params = load_params(params_file)
    reference.run(params)
    one = sweep.run(params, steps=3, eta=1.0)
    cell = ["--steps", "3", "--eta", "1.0", "--params", str(params_file)]
    two = torchrun(2, "sweep-cell", tmp_path / "cell.json", *cell)
    assert (one["processes"], two["processes"]) == (1, 2) and one["num_samples"] == two["num_samples"] == 10
    assert two["fid"] == pytest.approx(one["fid"], abs=1e-6)

    settings = ["sample.steps=3", "sample.eta=1.0", "sample.num_samples=10", "sample.batch_size=1"]
    sample.run(load_params(params_file, [*settings, f"paths.samples={tmp_path / '1'}"]))
    sets = [a for s in [*settings, f"paths.samples={tmp_path / '2'}"] for a in ("--set", s)]
    stats = torchrun(2, "sample", tmp_path / "sample.json", "--params", str(params_file), *sets)
    assert stats["complete"] and stats["num_samples"] == 10 and stats["nfe_min"] == stats["nfe_max"] == 3
    np.testing.assert_array_equal(read_images(tmp_path / "2", 10), read_images(tmp_path / "1", 10))


def two_machines(stage: str, section: str, params_file: Path, *args: str) -> dict:
    """Rank 0's result of ``ddim <stage>`` run as on two "machines" on 127.0.0.1: the same command twice at once,
    with ``<section>.nnodes=2``, one process each (one thread), meeting at a c10d rendezvous. Each command prints
    its result: rank 0's, or ``{}`` on the machine without it."""
    from helpers import cli_env, free_port

    from pipelines.flows import torchrun_launcher

    nodes = [f"{section}.nnodes=2", f"{section}.rdzv_endpoint=127.0.0.1:{free_port()}", f"{section}.rdzv_id=t"]
    launcher = torchrun_launcher(1, getattr(load_params(params_file, nodes), section), {"steps": 3})
    assert "--nnodes=2" in launcher and "--rdzv-id=t-3" in launcher and "--standalone" not in launcher
    sets = [arg for item in nodes for arg in ("--set", item)]
    machines = [
        subprocess.Popen(
            [str(BIN / "ddim"), stage, "--params", str(params_file), *args, *sets],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**cli_env(), "OMP_NUM_THREADS": "1"},
        )
        for _ in "ab"
    ]
    outputs = [m.communicate(timeout=600) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(bool(a) for a in answers) == [False, True], "one rank 0 in the job, on one of the machines"
    return next(a for a in answers if a)


@pytest.mark.integration
def test_two_machines_draw_the_images_and_get_the_fid_of_one(trained, tmp_path, one_thread):
    """sample.nnodes and sweep.nnodes: two machines meet at a rendezvous and split the images by index; the
    statistics are merged exactly: the one-machine FID and, image for image, the one-machine samples."""
    from tasks import sample

    params_file = with_sweep(trained, tmp_path, eta=[1.0], batch_size=1)
    params = load_params(params_file)
    reference.run(params)
    one = sweep.run(params, steps=3, eta=1.0)
    two = two_machines("sweep-cell", "sweep", params_file, "--steps", "3", "--eta", "1.0")
    assert (one["processes"], two["processes"]) == (1, 2) and two["num_samples"] == 10
    assert two["fid"] == pytest.approx(one["fid"], abs=1e-6)

    settings = ["sample.steps=3", "sample.num_samples=10", "sample.batch_size=1"]
    sample.run(load_params(params_file, [*settings, f"paths.samples={tmp_path / '1'}"]))
    sets = [a for s in [*settings, f"paths.samples={tmp_path / '2'}"] for a in ("--set", s)]
    stats = two_machines("sample", "sample", params_file, *sets)
    assert stats["complete"] and stats["num_samples"] == 10
    np.testing.assert_array_equal(read_images(tmp_path / "2", 10), read_images(tmp_path / "1", 10))


def dvc_matrix(tmp_path: Path, params_text: str, prefix: str) -> tuple:
    """The project's dvc.yaml with ``params_text`` as params.yaml in ``tmp_path``: the params, and the stages DVC
    generates whose names start with ``prefix``."""
    from dvc.repo import Repo

    (tmp_path / "params.yaml").write_text(params_text)
    (tmp_path / "dvc.yaml").write_text((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    Repo.init(str(tmp_path), no_scm=True)
    with contextlib.chdir(tmp_path):
        return load_params("params.yaml"), [s for s in Repo(".").index.stages if s.name.startswith(prefix)]


@pytest.mark.parametrize("literal", ["[0, 1]", "[0.0, 0.5, 1]", "[0.2, 1.0]"])
def test_dvc_and_the_cells_name_a_cell_the_same_way_whatever_the_yaml_literal(tmp_path, literal):
    """DVC renders ``${item.eta}`` as the value YAML wrote (``0`` -> ``eta0``); the cell, given ``--eta 0`` by
    DVC's command line, and the table, reading params.yaml, must name the file the same."""
    from tasks.common.grid import cell_path, number

    root = Path(__file__).resolve().parents[1]
    text = (root / "params.yaml").read_text()
    head, sweep = text.split("\nsweep:\n", 1)
    sweep = re.sub(r"(?m)^  eta: \[[^\]]*\]", f"  eta: {literal}", sweep, count=1)
    text = f"{head}\nsweep:\n{sweep}"
    assert f"  eta: {literal}" in text
    params, stages = dvc_matrix(tmp_path, text, "sweep@")
    by_dvc = {str(s.outs[0].def_path) for s in stages}
    etas = {s.cmd.split("--eta ")[1] for s in stages}
    by_code = {str(cell_path(params, steps, number(eta))) for steps in params.sweep.steps for eta in etas}
    from_params = {str(cell_path(params, s, e)) for s in params.sweep.steps for e in params.sweep.eta}
    assert by_dvc == by_code == from_params
    overridden = load_params(tmp_path / "params.yaml", ["sweep.eta=[0,0.5]"]).sweep.eta
    assert overridden == [0, 0.5] and type(overridden[0]) is int


@pytest.mark.parametrize("solvers", ["[dpm-solver++-order2, unipc-bh2-order3]", "[]"])
def test_dvc_and_the_solver_cells_name_a_cell_the_same_way(tmp_path, solvers):
    from tasks.common.grid import solver_cell_path

    root = Path(__file__).resolve().parents[1]
    text, count = re.subn(r"(?m)^  solvers: \[[^\]]*\]", f"  solvers: {solvers}", (root / "params.yaml").read_text())
    assert count == 1
    params, stages = dvc_matrix(tmp_path, text, "sweep-solver@")
    by_dvc = {str(s.outs[0].def_path): s.cmd.split()[-4:] for s in stages}
    by_code = {
        str(solver_cell_path(params, v, n)): ["--solver", v, "--steps", str(n)]
        for v in params.sweep.solvers
        for n in params.sweep.steps
    }
    assert by_dvc == by_code and len(by_code) == len(params.sweep.solvers) * len(params.sweep.steps)
