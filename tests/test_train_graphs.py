"""The training step as a CUDA graph (``train.cuda_graphs``) and the dataset in device memory
(``train.data_on_device``), held on the CPU to the eager step and the DataLoader they replace.

Off CUDA, ``cuda_graphs: true`` runs :class:`tasks.train.GraphedStep`'s work uncaptured: the static buffers,
the seeding before each replay, the learning rate set in place, the flat-buffer all-reduce under DDP and the
EMA are all the graph's, only the capture is not. Capture itself needs a GPU (``benchmarks/gpu.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import refuse_host_reads, setup_run

from tasks import train
from tasks.common import graphs
from tasks.common.config import TrainConfig, load_params
from tasks.common.distributed import Ranks
from tasks.train import GraphedStep, batches, build_trainer, fit_optimizer, graph_plan, make_step

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "pipelines.ranks", "train"]


def weights(tmp_path: Path, mlflow_uri: str, **settings) -> str:
    return train.run(load_params(setup_run(tmp_path, mlflow_uri, **settings)))["weights_sha256"]


def test_the_graphs_step_learns_the_eager_steps_weights_bit_for_bit(tmp_path, mlflow_uri, capfd):
    eager = weights(tmp_path / "eager", mlflow_uri, steps=12, cuda_graphs=False)
    assert "train.cuda_graphs" not in capfd.readouterr().err
    graphed = weights(tmp_path / "graphed", mlflow_uri, steps=12, cuda_graphs=True)
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("train.cuda_graphs")]
    assert said == ["train.cuda_graphs: no CUDA device here: the graph's step runs, uncaptured"]
    assert graphed == eager


def test_a_graphed_run_resumed_takes_the_steps_of_an_eager_run_that_ran_through(tmp_path, mlflow_uri):
    through = weights(tmp_path / "through", mlflow_uri, steps=20)
    first = load_params(setup_run(tmp_path / "resumed", mlflow_uri, steps=10, cuda_graphs=True))
    train.run(first)
    resumed = train.run(load_params(setup_run(tmp_path / "resumed", mlflow_uri, steps=20, cuda_graphs=True)))
    assert resumed["resumed_from"] == 10
    assert resumed["weights_sha256"] == through


def test_device_batches_are_the_dataloaders_across_epochs_ranks_and_resume_offsets(tmp_path, mlflow_uri):
    """128 images, batches of 16: 8 steps an epoch. Rank 1 of 2 reads its own half, from mid-epoch too."""
    loader = build_trainer(load_params(setup_run(tmp_path, mlflow_uri, data_on_device=False)))
    resident = build_trainer(load_params(setup_run(tmp_path, mlflow_uri, data_on_device=True)))
    assert loader.images is None and resident.images is not None
    for start, ranks in ((0, Ranks()), (13, Ranks()), (5, Ranks(rank=1, local_rank=1, world_size=2))):
        a, b = (dataclasses.replace(t, start_step=start, dist=ranks) for t in (loader, resident))
        theirs, ours = list(batches(a, start + 20)), list(batches(b, start + 20))
        assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(start, start + 20))
        for (_, x), (_, y) in zip(theirs, ours, strict=True):
            assert y.dtype == x.dtype and torch.equal(x, y)


def test_the_step_falls_back_to_eager_where_a_graph_cannot_hold_it_and_says_why_once(tmp_path, mlflow_uri, capfd):
    trainer = build_trainer(load_params(setup_run(tmp_path, mlflow_uri, precision="fp16", cuda_graphs=True)))
    assert trainer.graphs is False and not isinstance(make_step(trainer), GraphedStep)
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("train.cuda_graphs")]
    assert said == [
        "train.cuda_graphs: fp16's GradScaler decides on the host whether each step is taken, which a graph cannot "
        "hold; the eager step runs"
    ]


@pytest.mark.parametrize(
    "setting, device, precision, compile_, expected",
    [
        ("auto", "cuda", "bf16", False, (True, None)),
        ("auto", "cuda", "fp32", False, (True, None)),
        ("auto", "cpu", "fp32", False, (False, None)),
        ("auto", "mps", "fp32", False, (False, None)),
        (False, "cuda", "bf16", False, (False, None)),
        ("auto", "cuda", "fp16", False, (False, "fp16's GradScaler")),
        (True, "cuda", "bf16", True, (False, "train.compile is on")),
        (True, "cpu", "fp32", False, (True, "no CUDA device here")),
    ],
)
def test_graph_plan(setting, device, precision, compile_, expected):
    cfg = TrainConfig(cuda_graphs=setting, compile=compile_)
    graphs, why = graph_plan(cfg, torch.device(device), precision)
    assert graphs is expected[0]
    assert (why is None) if expected[1] is None else why.startswith(expected[1])


def test_an_adam_state_of_a_graphed_run_resumes_eagerly_and_back():
    """A graphed run's checkpoint holds a tensor learning rate and capturable groups; an eager run's, floats."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    for group in optimizer.param_groups:  # as loaded from a graphed run's checkpoint
        group["lr"], group["capturable"] = torch.tensor(5e-4), True
    fit_optimizer(optimizer, capturable=False)
    for group in optimizer.param_groups:  # (the value is set again at every step)
        assert type(group["lr"]) is float and group["lr"] == pytest.approx(5e-4) and group["capturable"] is False
    assert all(s["step"].device.type == "cpu" for s in optimizer.state.values())
    optimizer.step()  # would refuse a capturable group on the CPU


def test_the_graphed_step_reads_nothing_back_from_the_device(tmp_path, mlflow_uri, monkeypatch):
    """What a captured graph could not hold: a host read (bool, item, tolist, float) of a tensor inside it."""
    trainer = build_trainer(load_params(setup_run(tmp_path, mlflow_uri, cuda_graphs=True, data_on_device=True)))
    step, data = make_step(trainer), batches(trainer, 4)
    assert isinstance(step, GraphedStep)
    step(next(data)[1], 0)  # the eager first step (the EMA's copy)
    counters = {id(state["step"]) for state in trainer.optimizer.state.values()}  # on the CPU off CUDA

    refuse_host_reads(monkeypatch, counters)
    for index in (1, 2, 3):
        step(next(data)[1], index)


@pytest.mark.integration
def test_two_graphed_ranks_all_reduce_as_ddp_does(tmp_path, mlflow_uri):
    """Under torchrun the graphed step does not wrap the model in DDP: it averages the gradients in one
    all-reduce of a flat buffer, between its two graphs. The weights are DDP's, bit for bit."""
    results = {}
    for graphed in (False, True):
        params = setup_run(tmp_path / str(graphed), mlflow_uri, steps=6, batch_size=8, cuda_graphs=graphed)
        result = params.parent / "result.json"
        out = subprocess.run(
            [*TORCHRUN, "--result", str(result), "--params", str(params)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=params.parent,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results[graphed] = json.loads(result.read_text())
    assert results[True]["ranks_in_sync"] is True
    assert results[True]["weights_sha256"] == results[False]["weights_sha256"]


class FakeCuda:
    """torch.cuda's graph API without a GPU: a "capture" records the function and runs nothing, a replay runs
    what was recorded; ``fail`` makes the capture raise as an uncapturable operation does."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.recording, self.log, self.fail = None, [], fail
        fake = self

        class Graph:
            def replay(self):
                fake.log.append("replay")
                self.work()

        @contextlib.contextmanager
        def graph(g):
            fake.recording = g
            yield
            if fake.fail:
                raise RuntimeError("operation not permitted when stream is capturing\nmore")

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(graphs, "on_side_stream", lambda fn: (self.log.append("side"), fn())[1])


@pytest.mark.parametrize("fail", [False, True])
def test_graphed_warms_up_captures_once_then_replays_and_stays_eager_where_capture_fails(monkeypatch, capfd, fail):
    cuda = FakeCuda(monkeypatch, fail)
    done = []

    def work():
        if cuda.recording is not None and not hasattr(cuda.recording, "work"):  # being captured: record only
            cuda.recording.work = work
            return "static"
        done.append(1)
        return "out"

    graphed = graphs.Graphed(work, torch.device("cuda"), warmup=2)
    outs = [graphed() for _ in range(5)]
    assert len(done) == 5, "each call does the work once"
    if not fail:
        assert cuda.log == ["side", "side", "replay", "replay", "replay"] and outs[2:] == ["static"] * 3
        assert capfd.readouterr().err == ""
    else:
        assert cuda.log == ["side"] * 5 and outs == ["out"] * 5
        said = capfd.readouterr().err.splitlines()
        assert said == [
            "CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing): "
            "the work runs eagerly"
        ]
