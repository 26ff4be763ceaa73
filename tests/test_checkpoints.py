"""Checkpoints kept per recipe: a run reads and prunes only its own recipe's folder, resumes it whatever ran in
between, never deletes another recipe's; `ddim checkpoints` lists them and deletes only what the user names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import cli_env

from tasks import train
from tasks.common.checkpoint import list_checkpoints, older_than, read_recipe, recipe_folders, recipe_id
from tasks.common.config import load_params
from tasks.train import TrainingError, batches, training_fingerprint

DDIM = str(Path(sys.executable).with_name("ddim"))
BIN = Path(sys.executable).parent

PROJECT = {
    "data": {"source": "shapes", "name": "s", "count": 32, "image_size": 16},
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
    "train": {
        "steps": 4,
        "batch_size": 8,
        "log_every": 2,
        "sample_every": 0,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "num_workers": 0,
        "deterministic": True,
    },
}


@pytest.fixture
def project(make_project) -> Path:
    return make_project(PROJECT)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def ddim(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DDIM, *args], capture_output=True, text=True, cwd=cwd, env=cli_env(), timeout=timeout)


def summary_of(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_recipe_is_the_global_batch_not_the_per_process_one(project):
    params = load_params("params.yaml")
    one_by_16 = training_fingerprint(load_params("params.yaml", ["train.batch_size=16"]), "sha", 1)
    assert training_fingerprint(params, "sha", 2) == one_by_16  # 2 x 8 continues 1 x 16
    assert training_fingerprint(load_params("params.yaml", ["train.batch_size=16"]), "sha", 2) != one_by_16
    assert training_fingerprint(load_params("params.yaml", ["train.steps=9"]), "sha", 1) == training_fingerprint(
        params, "sha", 1
    )  # more steps: the same recipe


def test_another_recipe_leaves_the_first_ones_checkpoints_and_it_resumes_them(project):
    a = train.run(load_params("params.yaml"))
    (a_dir,) = recipe_folders(project / "data" / "checkpoints")
    a_files = files_of(a_dir)
    assert {"ckpt-00000002.pt", "ckpt-00000004.pt", "recipe.json", "mlflow_run_id"} <= a_files.keys()

    b = train.run(load_params("params.yaml", ["train.lambda_reg=0"]))
    assert b["resumed_from"] == 0 and b["mlflow_run_id"] != a["mlflow_run_id"]
    assert files_of(a_dir) == a_files, "recipe B touched none of A's files"
    assert len(recipe_folders(project / "data" / "checkpoints")) == 2

    again = train.run(load_params("params.yaml", ["train.steps=6"]))
    assert again["resumed_from"] == 4 and again["mlflow_run_id"] == a["mlflow_run_id"]
    assert [p.name for p in list_checkpoints(a_dir)] == ["ckpt-00000002.pt", "ckpt-00000004.pt", "ckpt-00000006.pt"]


def test_the_flat_layout_of_earlier_versions_is_moved_into_its_recipe_folder_and_resumed(project):
    train.run(load_params("params.yaml"))
    root = project / "data" / "checkpoints"
    (folder,) = recipe_folders(root)
    for path in list_checkpoints(folder):  # as the earlier version wrote them: flat, batch_size per process
        state = torch.load(path, weights_only=True)
        recipe = dict(state["fingerprint"]["train"])
        recipe["batch_size"] = recipe.pop("global_batch") // 2  # made by 2 processes of half the batch
        ran = {**state["params"], "train": {**state["params"]["train"], "nproc_per_node": 2, "batch_size": 4}}
        legacy = {**state, "params": ran, "fingerprint": {**state["fingerprint"], "train": recipe}}
        torch.save(legacy, root / path.name)
    os.replace(folder / "mlflow_run_id", root / "mlflow_run_id")
    run_id = (root / "mlflow_run_id").read_text().strip()
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    (root / "notes.txt").write_text("the user's")

    resumed = train.run(load_params("params.yaml", ["train.steps=6"]))
    assert resumed["resumed_from"] == 4 and resumed["mlflow_run_id"] == run_id
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted([folder.name, "notes.txt"])
    assert [p.name for p in list_checkpoints(folder)] == ["ckpt-00000002.pt", "ckpt-00000004.pt", "ckpt-00000006.pt"]


def test_resume_never_refuses_to_write_over_the_recipes_checkpoints(project):
    train.run(load_params("params.yaml"))
    (folder,) = recipe_folders(project / "data" / "checkpoints")
    before = files_of(folder)
    with pytest.raises(TrainingError, match=r"holds checkpoints of this recipe up to step 4: delete them first"):
        train.run(load_params("params.yaml", ["train.resume=never"]))
    assert files_of(folder) == before


@pytest.mark.integration
def test_recipe_a_then_b_then_a_through_the_cli_and_ddim_checkpoints(project):
    """The issue's case: A, then B, then A again: A's checkpoints all still exist and A resumes its newest;
    `ddim checkpoints` lists both in words and deletes only the one named."""
    root = project / "data" / "checkpoints"
    a = summary_of(ddim(project, "train"))
    (a_dir,) = recipe_folders(root)
    a_files = files_of(a_dir)
    summary_of(ddim(project, "train", "--set", "train.lambda_reg=0"))
    assert files_of(a_dir) == a_files
    again = summary_of(ddim(project, "train", "--set", "train.steps=6"))
    assert again["resumed_from"] == 4 and again["mlflow_run_id"] == a["mlflow_run_id"]

    listing = ddim(project, "checkpoints")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["recipe", "data", "model", "differs"]
    (b_dir,) = [f for f in recipe_folders(root) if f != a_dir]
    a_row, b_row = (next(line for line in lines if line.startswith(f.name)) for f in (a_dir, b_dir))
    assert "lambda_reg=0.1" in a_row and " 6 " in a_row and "ch32" in a_row
    assert "lambda_reg=0.0" in b_row and " 4 " in b_row

    missing = ddim(project, "checkpoints", "--delete", "0123456789ab")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("ddim checkpoints: error: '0123456789ab' is no recipe")
    b_id = recipe_id(json.loads((b_dir / "recipe.json").read_text())["fingerprint"])
    deleted = ddim(project, "checkpoints", "--delete", b_id)
    assert deleted.returncode == 0, deleted.stderr
    assert recipe_folders(root) == [a_dir] and len(list_checkpoints(a_dir)) == 3

    old = time.time() - 40 * 86400
    for path in a_dir.iterdir():
        os.utime(path, (old, old))
    assert ddim(project, "checkpoints", "--delete-older-than", "not-a-date").returncode == 1
    kept = ddim(project, "checkpoints", "--delete-older-than", time.strftime("%Y-%m-%d", time.localtime(old - 86400)))
    assert kept.returncode == 0 and recipe_folders(root) == [a_dir]
    gone = ddim(project, "checkpoints", "--delete-older-than", time.strftime("%Y-%m-%d"))
    assert gone.returncode == 0 and "deleted" in gone.stdout and recipe_folders(root) == []


@pytest.mark.integration
def test_two_processes_of_half_the_batch_resume_one_and_double_the_batch_is_its_own_recipe(project):
    """Resuming with another process count never changes the global batch in the middle of a run."""
    train.run(load_params("params.yaml", ["train.batch_size=16"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "pipelines.ranks", "train"]

    def torchrun(*sets: str) -> dict:
        """Rank 0's result, from the file it writes."""
        args = [a for s in sets for a in ("--set", s)]
        result = project / "result.json"
        result.unlink(missing_ok=True)
        command = [*launcher, "--result", str(result), "--params", "params.yaml", *args]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(result.read_text())

    assert torchrun("train.batch_size=8", "train.steps=6")["resumed_from"] == 4
    assert torchrun("train.batch_size=16", "train.steps=6")["resumed_from"] == 0  # global batch 32: a new recipe
    assert len(recipe_folders(project / "data" / "checkpoints")) == 2


def test_every_step_reads_the_same_images_whatever_the_process_count_at_one_global_batch():
    """What lets 2 x 8 continue 1 x 16: the union of the ranks' batches at each step is the same set of images."""
    data = torch.arange(100)

    def steps(world: int, batch: int, start: int) -> list[set[int]]:
        per_rank = []
        for rank in range(world):
            cfg = SimpleNamespace(seed=3, batch_size=batch, num_workers=0)
            run = SimpleNamespace(
                cfg=cfg, dist=SimpleNamespace(world_size=world, rank=rank), dataset=data, start_step=start,
                global_batch=batch * world, device=torch.device("cpu"), images=None,
            )  # fmt: skip
            per_rank.append([set(x.tolist()) for _, x in batches(run, 14)])
        return [set().union(*sets) for sets in zip(*per_rank, strict=True)]

    one = steps(1, 16, 0)
    assert len(one) == 14 and all(len(s) == 16 for s in one)  # 6 steps an epoch: two epochs and a bit
    assert steps(2, 8, 5) == one[5:] and steps(4, 4, 9) == one[9:]


def test_checkpoints_that_cannot_be_read_are_never_started_over_and_written_across(project):
    train.run(load_params("params.yaml"))
    (folder,) = recipe_folders(project / "data" / "checkpoints")
    for path in list_checkpoints(folder):
        path.write_bytes(b"damaged")
    before = files_of(folder)
    with pytest.raises(TrainingError, match=r"none of the 2 checkpoints in .* can be read: move them away"):
        train.run(load_params("params.yaml", ["train.steps=6"]))
    assert files_of(folder) == before


def test_a_folder_of_the_users_that_looks_like_a_recipe_is_no_recipe(project):
    train.run(load_params("params.yaml"))
    root = project / "data" / "checkpoints"
    (root / "backup-3f2a9c1b7d4e").mkdir()
    (root / "backup-3f2a9c1b7d4e" / "notes.txt").write_text("mine")
    (recipe,) = recipe_folders(root)
    assert recipe.name != "backup-3f2a9c1b7d4e"
    assert older_than([read_recipe(f) for f in recipe_folders(root)], "2999-01-01") == [read_recipe(recipe)]
