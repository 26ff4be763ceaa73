"""Bad input and faults through the real CLI: exit status 1, one `ddim <command>: error:` line that is the last
on stderr, no traceback, and nothing changed but the stage's own lock file. The cases, by class:

- params and flags: not UTF-8, a value out of range, an unknown tracking URI scheme, an invalid cron, --debug;
  NaN and infinity, a dataset larger than the disk;
- hostile YAML: an alias bomb ("billion laughs"), a python/object tag (runs nothing), a file of megabytes, a
  bad value of hundreds of elements (quoted short);
- foreign or damaged files: metrics.json, manifest.json, images.npy, model.pt, the reference .npz, the samples'
  record, a non-image named .png, two .npz given to `ddim evaluate`, a damaged MLflow database (`ddim runs`:
  one line; training: completes, with a warning);
- files that would run code when loaded: model.pt (to sample and to import-model) and checkpoints (never
  loaded but as weights);
- names and paths that climb out: `ddim checkpoints --delete` of `..`, `/`, a file, a data name;
- hostile inputs, bounded: a device as data.path, a zip member or an image over the caps (refused, or skipped
  with data.on_bad_image: skip), a FIFO, a link to /dev/zero, a dangling link and a looping link in an image
  folder (skipped), a download whose MD5 is wrong (final: one request, no retries);
- concurrency: a second run on an output that a first one holds, several stages creating one MLflow database,
  deleting a recipe that a run is training;
- faults: a device out of memory (one line naming the batch size), a kill in the middle of `ddim prepare`
  and a rerun (the same dataset as an uninterrupted run);
- the operating system: a full disk.

(The stages' refusals to delete are tested beside each stage: a foreign samples folder, a folder that is not a
prepared dataset; SIGTERM and SIGKILL of a stage, and NaN weights and statistics, in test_sample_evaluate;
SIGKILL of training in test_train; checkpoints of other recipes in test_checkpoints; tracking servers that stop
answering in test_tracking_outage.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cli_env, free_port
from PIL import Image

from tasks import sample, train
from tasks.common.config import load_params
from tasks.common.files import exclusive
from tasks.prepare import build_dataset

DDIM = str(Path(sys.executable).with_name("ddim"))
OWN_LOCK = re.compile(r"(.*/)?\.[^/]+\.lock")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the stages' lock files, which are theirs to write."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not OWN_LOCK.fullmatch(str(p.relative_to(folder))))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def ddim(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ddim args`` in ``cwd`` (the test session's Prefect home is elsewhere)."""
    return subprocess.run([DDIM, *args], capture_output=True, text=True, cwd=cwd, env=cli_env(), timeout=timeout)


def fail(cwd: Path, *args: str) -> str:
    """Run ``ddim args`` in ``cwd``; check the failure's form and that nothing changed; its error line."""
    before = snapshot(cwd)
    out = ddim(cwd, *args)
    command = next(a for a in args if not a.startswith("--"))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ddim {command}: error: "), out.stderr
    assert snapshot(cwd) == before
    return last.split(": error: ", 1)[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text("evaluate:\n  reference_count: 16\n")
    return tmp_path


def test_a_params_file_that_is_not_utf8(project):
    (project / "params.yaml").write_bytes(b"sample:\n  steps: 10 # \xff\xfe\n")
    assert "params.yaml: not UTF-8 text (byte" in fail(project, "report")


def test_a_negative_reference_count(project):
    assert "evaluate.reference_count" in fail(project, "report", "--set", "evaluate.reference_count=-60")


def test_an_unknown_tracking_uri_scheme(project):
    assert "'foo://x' is not an MLflow tracking URI" in fail(project, "runs", "--set", "tracking.uri=foo://x")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"fid": 1.0}'])
def test_a_metrics_file_that_ddim_evaluate_did_not_write(project, content):
    (project / "results").mkdir()
    (project / "results" / "metrics.json").write_text(content)
    assert "is not a metrics file of ddim evaluate" in fail(project, "report")


def test_a_csv_path_that_cannot_be_written(project, tmp_path_factory):
    store = f"tracking.uri=sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    message = fail(project, "runs", "--set", store, "--csv", str(project / "missing" / "runs.csv"))
    assert str(project / "missing") in message  # pandas' own words: "Cannot save file into a non-existent directory"


def test_an_invalid_cron_schedule(project):
    assert fail(project, "serve", "--cron", "every night") == (
        "--cron 'every night' is not a cron schedule: five fields, e.g. '0 3 * * *'"
    )


def test_debug_prints_the_traceback_before_the_one_line(project):
    out = ddim(project, "--debug", "report", "--set", "evaluate.reference_count=-60")
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("ddim report: error: ")


def test_a_full_disk(project, tmp_path_factory):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    store = f"tracking.uri=sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    message = fail(project, "runs", "--set", store, "--csv", "/dev/full")
    assert message.startswith("No space left on device: /dev/full (free some space")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not an npz", "is not an .npz file"),
        ("keys", "with arrays mu and sigma ('mu is not a file in the archive')"),
        ("shapes", "holds mu (3,) and sigma (2, 2): not statistics"),
        ("objects", "Object arrays cannot be loaded"),
    ],
)
def test_statistics_files_given_to_ddim_evaluate(project, content, message):
    path = project / "a.npz"
    if content == "keys":
        np.savez(path, m=np.zeros(3))
    elif content == "shapes":
        np.savez(path, mu=np.zeros(3), sigma=np.zeros((2, 2)))
    elif content == "objects":
        np.savez(path, mu=np.array([{}], dtype=object), sigma=np.zeros((1, 1)))
    else:
        path.write_bytes(content)
    assert message in fail(project, "evaluate", "a.npz", "a.npz")


def test_a_file_named_png_that_is_not_an_image(project):
    for folder in ("a", "b"):
        (project / folder).mkdir()
        Image.new("RGB", (8, 8), "red").save(project / folder / "0.png")
        Image.new("RGB", (8, 8), "blue").save(project / folder / "1.png")
    (project / "a" / "2.png").write_text("not a png")
    assert "cannot read image a/2.png" in fail(project, "evaluate", "a", "b", "--set", "evaluate.num_workers=1")


# ---------------------------------------------------------------------------------------------------------
# A micro project whose stages have run, then damaged one file at a time
# ---------------------------------------------------------------------------------------------------------

MICRO = {
    "data": {"source": "shapes", "name": "s", "count": 32, "image_size": 16},
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "sample_every": 0, "checkpoint_every": 2, "num_workers": 0},
    "sample": {"num_samples": 4, "batch_size": 4, "steps": 2},
    "evaluate": {"reference_count": 16, "batch_size": 16, "num_workers": 0},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The micro project after prepare, train and sample (run in this process: the set-up is not under test)."""
    root = tmp_path_factory.mktemp("built")
    (root / "params.yaml").write_text(yaml.safe_dump(MICRO))
    with contextlib.chdir(root):
        params = load_params("params.yaml")
        build_dataset(params.data, params.paths)
        train.run(params)
        sample.run(params)
    return root


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A fresh copy of the built project, to damage."""
    return Path(shutil.copytree(built, tmp_path / "project", symlinks=True))


TRAIN_ELSEWHERE = ["--set", "paths.train=results/t2", "--set", "paths.checkpoints=results/c2"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d / "images.npy", "images.npy cannot be read (mmap length is greater than file size)"),
        (lambda d: d / "manifest.json", "manifest.json is not JSON"),
        (lambda d: (d / "manifest.json").write_text("[1, 2]"), "is not a manifest of `ddim prepare`"),
    ],
    ids=["truncated-array", "truncated-manifest", "foreign-manifest"],
)
def test_a_damaged_prepared_dataset(copy, damage, message):
    target = damage(copy / "data" / "prepared" / "s")
    if isinstance(target, Path):
        os.truncate(target, target.stat().st_size // 2)
    assert message in fail(copy, "train", *TRAIN_ELSEWHERE)


def _foreign_state_dict(path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: os.truncate(p, 1000), "is not a readable model file"),
        (lambda p: p.write_text("hello"), "is not a readable model file"),
        (_foreign_state_dict, "has no model_config and ema entries: it is not a model.pt of this pipeline"),
    ],
    ids=["truncated", "text", "another-architecture"],
)
def test_a_damaged_or_foreign_model(copy, damage, message):
    damage(copy / "results" / "train" / "model.pt")
    assert message in fail(copy, "sample", "--set", "paths.samples=results/s2")


@pytest.mark.integration
def test_damaged_inputs_of_the_evaluate_stage(copy):
    reference = copy / "data" / "reference" / "s.npz"
    reference.parent.mkdir(parents=True)
    reference.write_text("garbage")
    assert "is not an .npz file" in fail(copy, "evaluate")
    (copy / "results" / "samples" / "sample_stats.json").write_text("{")
    assert "holds a damaged record of `ddim sample`" in fail(copy, "evaluate")


@pytest.mark.integration
def test_a_device_as_data_path(copy):
    sets = ["--set", "data.source=folder", "--set", "data.path=/dev/zero", "--set", "data.name=z"]
    assert fail(copy, "prepare", *sets) == (
        "data.path /dev/zero is a device, pipe or socket: point it at a directory or .zip of images"
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.integration
def test_images_over_the_caps_are_refused_or_skipped(copy):
    """A zip of one good image, a member over data.max_file_bytes and a 20,000 x 20,000 PNG of 48 KB (400 M
    pixels, over data.max_image_pixels): refused by default, skipped with on_bad_image: skip."""
    with zipfile.ZipFile(copy / "in.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", _png(Image.new("RGB", (16, 16), "red")))
        zf.writestr("b.png", b"\0" * 3_000_000)
        zf.writestr("c.png", _png(Image.new("1", (20_000, 20_000))))
    sets = ["--set", "data.source=folder", "--set", "data.path=in.zip", "--set", "data.name=z"]
    sets += ["--set", "data.max_file_bytes=1000000"]
    assert "b.png in in.zip (too big: 3,000,000 bytes, over data.max_file_bytes = 1,000,000)" in fail(
        copy, "prepare", *sets
    )
    out = ddim(copy, "prepare", *sets, "--set", "data.on_bad_image=skip")
    assert out.returncode == 0, out.stderr
    assert "skipping unreadable image c.png (too big: Image size (400000000 pixels)" in out.stderr
    manifest = yaml.safe_load((copy / "data" / "prepared" / "z" / "manifest.json").read_text())
    assert (manifest["count"], manifest["skipped"]) == (1, 2)


@pytest.mark.integration
def test_a_download_with_the_wrong_md5_fails_at_once(copy, http_server):
    """A checksum mismatch is final: one request, no retries (a network failure would be retried)."""
    root, url = http_server
    (root / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    sets = ["--set", "data.source=cifar10", "--set", f"data.url={url}/cifar-10-python.tar.gz", "--set", "data.name=c"]
    start = time.monotonic()
    message = fail(copy, "prepare", *sets)
    assert "expected c58f30108f718f92721af3b95e74349a: the file there is not the expected one" in message
    assert time.monotonic() - start < 60 and http_server.requests == ["/cifar-10-python.tar.gz"]


@pytest.mark.integration
def test_a_second_run_on_a_held_output_names_the_first(copy):
    with exclusive(copy / "results" / "train", "`ddim train`"):
        message = fail(copy, "train")
    assert message == (
        f"results/train is being written by `ddim train` (PID {os.getpid()}, since "
        + message.split("since ", 1)[1].split(")")[0]
        + "): wait for it to finish, or stop it"
    )


@pytest.mark.integration
def test_stages_that_start_at_once_create_one_mlflow_database(tmp_path):
    """Four processes open a new sqlite store at the same moment: without the lock, most die in a migration."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys; from tasks.common.tracking import mlflow_client, _experiment_id\n"
        "print(_experiment_id(mlflow_client(sys.argv[1]), 'ddim', sys.argv[1]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    ids = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4 and len(set(ids)) == 1


def test_only_what_can_succeed_on_retry_is_retried():
    """The download task's retry condition: a network hiccup yes; a checksum, a 404, an unknown host, no."""
    import socket
    import urllib.error

    from prefect.states import Failed

    from pipelines.flows import _retryable
    from tasks.common.download import DownloadError, _transient

    def http(code: int) -> urllib.error.HTTPError:
        return urllib.error.HTTPError("http://x", code, "", None, None)

    assert [_transient(http(c)) for c in (404, 403, 408, 429, 500, 503)] == [False, False, True, True, True, True]
    assert _transient(urllib.error.URLError(TimeoutError())) and _transient(ConnectionResetError())
    assert not _transient(urllib.error.URLError(socket.gaierror(-2, "Name or service not known")))
    assert not _transient(ValueError("unknown url type: 'x'"))
    assert _retryable(None, None, Failed(data=DownloadError("reset", retryable=True)))
    assert not _retryable(None, None, Failed(data=DownloadError("has md5 ..., expected ...")))
    assert not _retryable(None, None, Failed(data=RuntimeError("a bug")))


def test_screenshots_of_ui_servers_that_are_not_running_are_one_line_and_no_file(tmp_path, capsys):
    """Chromium would render its own error page and save a picture of that: refused before it starts."""
    from pipelines.browser import main as screenshots

    dead = f"http://127.0.0.1:{free_port()}"
    assert screenshots(["--prefect", dead, "--mlflow", dead, "--out", str(tmp_path / "docs")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"ddim screenshots: error: nothing answers at {dead}/api/health .*: start the UIs with", last)
    assert not (tmp_path / "docs").exists()


# ---------------------------------------------------------------------------------------------------------
# A device out of memory: one line that names the batch size to lower
# ---------------------------------------------------------------------------------------------------------

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


def _raise(error: BaseException):
    def allocate(*args, **kwargs):
        raise error

    return allocate


def test_out_of_memory_in_training_names_train_batch_size(copy, tmp_path, monkeypatch, capsys):
    """As one rank under torchrun runs it (the CLI has a handler of its own around its flows, tested with `ddim
    evaluate A B` below); the U-Net's forward pass stands in for the allocator, which raises this on a GPU."""
    from models.unet import UNet
    from pipelines import ranks

    monkeypatch.chdir(copy)
    monkeypatch.setattr(UNet, "forward", _raise(torch.OutOfMemoryError(CUDA_OOM)))
    result = tmp_path / "result.json"
    assert ranks.main(["train", "--result", str(result), "--params", "params.yaml", "--set", "train.steps=4"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ddim train: error: the device ran out of memory ({CUDA_OOM}): lower train.batch_size")
    assert "(--set train.batch_size=N)" in last and "train.nproc_per_node" in last
    assert json.loads(result.read_text()) == {"error": last.removeprefix("ddim train: error: ")}


def test_out_of_memory_in_sampling_and_in_ddim_evaluate(copy, tmp_path, monkeypatch, capsys):
    from models.unet import UNet
    from pipelines import cli, ranks
    from tasks.common import fid

    monkeypatch.chdir(copy)
    monkeypatch.setattr(UNet, "forward", _raise(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")))
    result = tmp_path / "result.json"
    elsewhere = ["--set", "paths.samples=results/s2"]
    assert ranks.main(["sample", "--result", str(result), "--params", "params.yaml", *elsewhere]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ddim sample: error: the device ran out of memory (MPS backend out of memory")
    assert last.endswith("lower sample.batch_size (--set sample.batch_size=N)")
    assert json.loads(result.read_text()) == {"error": last.removeprefix("ddim sample: error: ")}

    monkeypatch.setattr(fid, "fid_between", _raise(torch.OutOfMemoryError(CUDA_OOM)))
    assert cli.main(["evaluate", "results/samples/images", "results/samples/images"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last == f"ddim evaluate: error: the device ran out of memory ({CUDA_OOM}): lower evaluate.batch_size "
        "(--set evaluate.batch_size=N)"
    )


def test_a_runtime_error_that_is_not_out_of_memory_stays_a_bug():
    from tasks.common.errors import out_of_memory

    assert out_of_memory("train", RuntimeError("shape mismatch")) is None
    assert out_of_memory("train", ValueError("out of memory")) is None


# ---------------------------------------------------------------------------------------------------------
# Hostile params, files that would run code, names that climb out, special files, a damaged tracking store
# ---------------------------------------------------------------------------------------------------------

BILLION_LAUGHS = "sweep:\n  eta: [[&a [0,0,0,0,0,0,0,0,0,0]]" + "".join(
    f", [&{b} [{', '.join([f'*{a}'] * 10)}]]" for a, b in zip("abcdefg", "bcdefgh", strict=True)
) + "]\n"  # fmt: skip


def test_a_yaml_alias_bomb_is_refused_at_once(project):
    """~300 bytes that expand to 10^8 values: it took 21 s and printed a 716 MB error line before."""
    (project / "params.yaml").write_text(BILLION_LAUGHS)
    start = time.monotonic()
    assert (
        fail(project, "report") == "params.yaml: not valid YAML (aliases (*name) are not allowed: write the value out)"
    )
    assert time.monotonic() - start < 30


def test_a_python_tag_runs_nothing(project):
    marker = project / "pwned"
    (project / "params.yaml").write_text(f'data: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert "not valid YAML (could not determine a constructor for the tag" in fail(project, "report")
    assert not marker.exists()


def test_a_huge_params_file_and_a_long_bad_value(project):
    (project / "params.yaml").write_bytes(b"#" * 2_000_000)
    assert fail(project, "report") == "params.yaml is 2,000,000 bytes, over 1,048,576: a params file is a few kB"
    (project / "params.yaml").write_text(f"sweep:\n  eta: [{list(range(500))}]\n")
    message = fail(project, "report")
    assert "got [0, 1, 2, 3" in message and "..." in message and len(message) < 600


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_params(project, value):
    assert "sweep.eta.0" in fail(project, "report", "--set", f"sweep.eta=[{value}]")
    assert "train.lr: Input should be a finite number" in fail(project, "report", "--set", f"train.lr={value}")


def test_a_dataset_larger_than_the_disk(project):
    sets = ["--set", "data.source=shapes", "--set", "data.count=1000000000000", "--set", "data.image_size=16"]
    message = fail(project, "prepare", *sets)
    assert message.startswith("1,000,000,000,000 images of 16x16 take 768,000.0 GB, more than the")
    assert message.endswith("lower data.count, or free some space")


def _code_running_pickle(path: Path, marker: Path) -> None:
    """A file that torch.load without weights_only would run: it touches ``marker``."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"model_config": Payload(), "ema": {}}))


@pytest.mark.integration
def test_model_and_checkpoint_files_that_would_run_code_run_nothing(copy):
    marker = copy / "pwned"
    _code_running_pickle(copy / "results" / "train" / "model.pt", marker)
    assert "is not a readable model file" in fail(copy, "sample", "--set", "paths.samples=results/s2")
    message = fail(copy, "import-model", "results/train/model.pt", "--out", "m.pt")
    assert message.endswith("is not a readable checkpoint (it holds Python objects besides tensors, which are never "
                            "loaded: they could run code)")  # fmt: skip
    (recipe,) = [p for p in (copy / "data" / "checkpoints").iterdir() if p.is_dir()]
    for path in recipe.glob("ckpt-*.pt"):
        _code_running_pickle(path, marker)
    message = fail(copy, "train", *TRAIN_ELSEWHERE[:2], "--set", "train.steps=4")  # never loaded but as weights
    assert (
        message == f"none of the 1 checkpoints in data/checkpoints/{recipe.name} can be read: move them away, "
        f"or delete them (ddim checkpoints --delete {recipe.name})"
    )
    assert not marker.exists()


@pytest.mark.integration
@pytest.mark.parametrize("name", ["..", "../..", "/", ".", "", "s", "ckpt-00000002.pt"])
def test_ddim_checkpoints_deletes_nothing_it_cannot_name(copy, name):
    assert "is no recipe in data/checkpoints" in fail(copy, "checkpoints", "--delete", name)


@pytest.mark.integration
def test_special_files_and_links_in_an_image_folder_are_skipped(copy):
    """A FIFO (would block a read forever), a link to /dev/zero (endless), a dangling link and a link that loops
    back to the folder: only the regular images, and a link to one outside, are read."""
    images = copy / "imgs"
    (images / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(images / f"{i}.png")
    Image.new("RGB", (16, 16), "blue").save(copy / "outside.png")
    os.mkfifo(images / "fifo.png")
    (images / "zero.png").symlink_to("/dev/zero")
    (images / "dangling.png").symlink_to(copy / "missing.png")
    (images / "out.png").symlink_to(copy / "outside.png")
    (images / "sub" / "loop").symlink_to("..")
    sets = ["--set", "data.source=folder", "--set", "data.path=imgs", "--set", "data.name=f"]
    out = ddim(copy, "prepare", *sets, timeout=120)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((copy / "data" / "prepared" / "f" / "manifest.json").read_text())
    assert manifest["count"] == 4 and manifest["skipped"] == 0


@pytest.mark.integration
def test_a_damaged_tracking_store(copy):
    """`ddim runs` cannot show what it cannot read: one line. Training records its metrics in the CSV and
    ends complete, with a warning that MLflow recorded nothing of the run."""
    (copy / "mlflow.db").write_bytes(os.urandom(20_000))
    assert "the MLflow store sqlite:///" in fail(copy, "runs")
    (copy / "results" / "t2").mkdir()
    (copy / "results" / "t2" / "mlflow_run_id").write_text("0123456789abcdef\n")  # an earlier model's run
    trained = ddim(copy, "train", *TRAIN_ELSEWHERE)
    assert trained.returncode == 0, trained.stderr
    assert "is unavailable (DatabaseError" in trained.stderr and "not recorded: this whole run" in trained.stderr
    assert (copy / "results" / "t2" / "model.pt").is_file()
    assert not (copy / "results" / "t2" / "mlflow_run_id").exists(), "evaluations must not nest under another run"


@pytest.mark.integration
def test_a_killed_prepare_then_a_rerun_makes_what_an_uninterrupted_run_makes(copy):
    sets = ["--set", "data.count=3000", "--set", "data.name=k"]
    proc = subprocess.Popen([DDIM, "prepare", *sets], cwd=copy, env=cli_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((copy / "data" / "prepared").glob(".k.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # part of the way through
    proc.kill()
    proc.wait()
    assert not (copy / "data" / "prepared" / "k").exists(), "nothing half-written looks complete"
    assert ddim(copy, "prepare", *sets).returncode == 0
    killed = json.loads((copy / "data" / "prepared" / "k" / "manifest.json").read_text())
    assert ddim(copy, "prepare", *sets[:2], "--set", "data.name=u").returncode == 0
    uninterrupted = json.loads((copy / "data" / "prepared" / "u" / "manifest.json").read_text())
    assert killed["sha256"] == uninterrupted["sha256"] and killed["count"] == 3000
    assert not list((copy / "data" / "prepared").glob(".k.tmp-*"))


@pytest.mark.integration
def test_deleting_a_recipe_that_a_run_is_training(copy):
    (recipe,) = [p for p in (copy / "data" / "checkpoints").iterdir() if p.is_dir()]
    with exclusive(recipe, "`ddim train`"):
        message = fail(copy, "checkpoints", "--delete", recipe.name)
    assert message.startswith(f"data/checkpoints/{recipe.name} is being written by `ddim train` (PID {os.getpid()}")
