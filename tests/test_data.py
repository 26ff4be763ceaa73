"""The prepare stage: every source end to end, every bad input, atomic output, and the reader."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.common.config import ConfigError, DataConfig, PathsConfig, load_params
from tasks.common.dataset import MANIFEST as MANIFEST_NAME
from tasks.common.dataset import DataError, PreparedDataset, load_manifest
from tasks.common.images import to_uint8
from tasks.prepare import build_dataset, shape_image


def paths_in(tmp_path: Path) -> PathsConfig:
    return PathsConfig(raw=tmp_path / "raw", prepared=tmp_path / "prepared")


def shapes(**kw) -> DataConfig:
    return DataConfig(**{"name": "s", "source": "shapes", "count": 100, "image_size": 16, **kw})


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


# ----- shapes


def test_shapes_dataset_is_deterministic_and_complete(tmp_path):
    paths = paths_in(tmp_path)
    a = build_dataset(shapes(), paths)
    b = build_dataset(shapes(name="again"), paths)
    c = build_dataset(shapes(name="other", seed=1), paths)
    assert a["sha256"] == b["sha256"] != c["sha256"]
    out = tmp_path / "prepared" / "s"
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "manifest.json", "preview.png"]
    manifest = load_manifest(out)
    assert {k: manifest[k] for k in ("source", "count", "height", "width", "channels", "skipped")} == {
        "source": "shapes",
        "count": 100,
        "height": 16,
        "width": 16,
        "channels": 3,
        "skipped": 0,
    }
    assert manifest["params"]["seed"] == 0
    assert "workers" not in manifest["params"], "how the data was decoded does not define it"
    array = np.load(out / "images.npy", mmap_mode="r")
    assert array.shape == (100, 16, 16, 3) and array.dtype == np.uint8
    assert hashlib.sha256(np.ascontiguousarray(array).data).hexdigest() == manifest["sha256"]
    assert Image.open(out / "preview.png").size == (8 * 18 + 2, 8 * 18 + 2)
    # image i does not depend on how many are generated
    np.testing.assert_array_equal(array[7], shape_image(16, 0, 7))
    assert leftovers(tmp_path / "prepared") == []


def test_shapes_are_visible_objects_on_a_background():
    for i in range(50):
        img = shape_image(32, 0, i).astype(int)
        corner = img[0, 0]
        differs = np.linalg.norm(img - corner, axis=-1) > 80
        assert 0.03 < differs.mean() < 0.6, f"image {i}: the shape should cover part of the image"


# ----- CIFAR-10 over HTTP


def cifar_archive(path: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    """A CIFAR-10 python archive in the real format (pickled dicts of uint8 [N, 3072] rows), tiny."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            batches[name] = data
            payload = pickle.dumps(
                {
                    b"batch_label": name.encode(),
                    b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
                    b"data": data,
                    b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
                },
                protocol=2,
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return batches


def nhwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("split", "batches"), [("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])]
)
def test_cifar10_downloads_verifies_and_reads(tmp_path, http_server, split, batches):
    root, url = http_server
    archive = root / "cifar-10-python.tar.gz"
    content = cifar_archive(archive)
    data = DataConfig(name="c", source="cifar10", split=split, count=None, url=f"{url}/cifar-10-python.tar.gz")
    manifest = build_dataset(data, paths_in(tmp_path), cifar10_md5=md5_of(archive))
    expected = np.concatenate([nhwc(content[b]) for b in batches])
    array = np.load(tmp_path / "prepared" / "c" / "images.npy")
    np.testing.assert_array_equal(array, expected)
    assert manifest["count"] == len(expected) and manifest["split"] == split
    assert (tmp_path / "raw" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()


def test_cifar10_wrong_checksum_leaves_nothing(tmp_path, http_server):
    root, url = http_server
    cifar_archive(root / "cifar-10-python.tar.gz")
    data = DataConfig(name="c", source="cifar10", count=None, url=f"{url}/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="md5 .* expected c58f30108f718f92721af3b95e74349a"):
        build_dataset(data, paths_in(tmp_path))  # the real MD5: the fixture cannot match it
    assert not (tmp_path / "raw" / "cifar-10-python.tar.gz").exists()
    assert not (tmp_path / "prepared" / "c").exists()
    assert leftovers(tmp_path) == []


def test_cifar10_unreachable_url_names_the_offline_fix(tmp_path, http_server):
    _, url = http_server
    data = DataConfig(name="c", source="cifar10", url=f"{url}/missing.tar.gz")
    with pytest.raises(DataError, match="set data.archive"):
        build_dataset(data, paths_in(tmp_path))


def test_cifar10_local_archive_checksum_and_truncation(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    cifar_archive(archive)
    data = DataConfig(name="c", source="cifar10", count=None, archive=archive)
    with pytest.raises(DataError, match="corrupt, truncated or not cifar-10-python.tar.gz"):
        build_dataset(data, paths_in(tmp_path))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:-400])
    data = DataConfig(name="c", source="cifar10", count=None, archive=truncated)
    with pytest.raises(DataError, match="truncated or corrupt"):
        build_dataset(data, paths_in(tmp_path), cifar10_md5=md5_of(truncated))
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataConfig(source="cifar10", archive=tmp_path / "nope.tar.gz"), paths_in(tmp_path))
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_cifar10_refuses_pickles_that_build_other_objects(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"x": __import__("collections").OrderedDict()})
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = DataConfig(name="c", source="cifar10", split="test", archive=archive)
    with pytest.raises(DataError, match="refusing to load collections.OrderedDict"):
        build_dataset(data, paths_in(tmp_path), cifar10_md5=md5_of(archive))


# ----- folders and zips


def make_folder(root: Path) -> None:
    """Images in every mode the importer must handle, at assorted sizes, in nested folders."""
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.new("L", (40, 30), 100).save(root / "a_gray.png")
    Image.new("RGBA", (50, 50), (255, 0, 0, 0)).save(root / "b_transparent.png")
    palette = Image.new("P", (33, 64), 0)
    palette.putpalette([0, 0, 255] * 256)
    palette.save(root / "sub" / "c_palette.gif.PNG")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(root / "sub" / "d_cmyk.jpg", quality=100)
    Image.fromarray(np.full((20, 20), 30000, dtype=np.uint16)).save(root / "sub" / "deeper" / "e_16bit.png")
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20] = (255, 0, 0)
    stripes[:, 20:40] = (0, 255, 0)
    stripes[:, 40:] = (0, 0, 255)
    Image.fromarray(stripes).save(root / "sub" / "f_wide.bmp")
    Image.new("RGB", (16, 16), (10, 200, 30)).save(root / "g.webp", lossless=True)
    (root / "notes.txt").write_text("not an image")


def folder(path: Path, **kw) -> DataConfig:
    return DataConfig(**{"name": "f", "source": "folder", "path": path, "image_size": 16, "count": None, **kw})


def test_folder_import_converts_every_mode(tmp_path):
    make_folder(tmp_path / "imgs")
    manifest = build_dataset(folder(tmp_path / "imgs"), paths_in(tmp_path))
    assert manifest["count"] == 7 and manifest["files"] == 7
    a = np.load(tmp_path / "prepared" / "f" / "images.npy").astype(int)
    assert a.shape == (7, 16, 16, 3)
    # sorted relative paths: a_gray, b_transparent, g.webp, sub/c_palette, sub/d_cmyk, sub/deeper/e, sub/f_wide
    assert (a[0] == 100).all()  # gray 100 -> (100, 100, 100)
    assert (a[1] == 255).all()  # fully transparent -> white
    assert (np.abs(a[2] - [10, 200, 30]) <= 1).all()
    assert (a[3] == [0, 0, 255]).all()  # palette
    assert (np.abs(a[4] - [255, 0, 0]) <= 8).all()  # CMYK (0, 255, 255, 0) is red
    assert (np.abs(a[5] - round(30000 / 65535 * 255)) <= 1).all()  # 16-bit gray scaled to 8 bits
    assert (a[6] == [0, 255, 0]).all()  # center crop of red|green|blue stripes is green


def test_zip_import_matches_folder_import_and_parallel_decoding(tmp_path):
    make_folder(tmp_path / "imgs")
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted((tmp_path / "imgs").rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(tmp_path / "imgs").as_posix())
    paths = paths_in(tmp_path)
    from_dir = build_dataset(folder(tmp_path / "imgs"), paths)
    from_zip = build_dataset(folder(zpath, name="z"), paths)
    parallel = build_dataset(folder(zpath, name="p", workers=2), paths)
    assert from_dir["sha256"] == from_zip["sha256"] == parallel["sha256"]


def test_corrupt_images_fail_or_are_skipped(tmp_path):
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "imgs" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read image broken.png .*data.on_bad_image=skip"):
        build_dataset(folder(tmp_path / "imgs"), paths_in(tmp_path))
    assert not (tmp_path / "prepared" / "f").exists()
    with pytest.warns(UserWarning, match="skipped 2 of 9 images"):
        manifest = build_dataset(folder(tmp_path / "imgs", on_bad_image="skip"), paths_in(tmp_path))
    assert manifest["count"] == 7 and manifest["skipped"] == 2
    assert np.load(tmp_path / "prepared" / "f" / "images.npy").shape == (7, 16, 16, 3)


def test_a_failed_run_keeps_the_previous_dataset(tmp_path):
    make_folder(tmp_path / "imgs")
    paths = paths_in(tmp_path)
    before = build_dataset(folder(tmp_path / "imgs"), paths)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError):
        build_dataset(folder(tmp_path / "imgs"), paths)
    assert load_manifest(tmp_path / "prepared" / "f")["sha256"] == before["sha256"]
    assert leftovers(tmp_path / "prepared") == []


def test_a_folder_that_is_not_a_prepared_dataset_is_never_replaced(tmp_path):
    """data.name (or paths.prepared) pointing at a folder of the user's is refused before any work; a
    prepared dataset of this pipeline, and an empty folder, are replaced as before."""
    paths = paths_in(tmp_path)
    users = tmp_path / "prepared" / "s"
    users.mkdir(parents=True)
    (users / "thesis.tex").write_text("mine")
    (users / MANIFEST_NAME).write_text('{"mine": true}')
    with pytest.raises(DataError, match=r"is not a prepared dataset of this pipeline \(thesis.tex\)"):
        build_dataset(shapes(), paths)
    assert (users / "thesis.tex").read_text() == "mine"
    (users / "thesis.tex").unlink()
    with pytest.raises(DataError, match=r"\(no manifest.json of this pipeline\)"):
        build_dataset(shapes(), paths)
    assert (users / MANIFEST_NAME).read_text() == '{"mine": true}'
    (users / MANIFEST_NAME).unlink()
    first = build_dataset(shapes(), paths)  # an empty folder is fine
    assert build_dataset(shapes(count=50), paths)["count"] == 50 != first["count"]  # ours: replaced
    (tmp_path / "prepared" / "file").write_text("x")
    with pytest.raises(DataError, match="is a file, not a prepared dataset"):
        build_dataset(shapes(name="file"), paths)


def test_all_images_unreadable(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no readable images"), pytest.warns(UserWarning):
        build_dataset(folder(tmp_path / "imgs", on_bad_image="skip"), paths_in(tmp_path))
    assert not (tmp_path / "prepared" / "f").exists()


def test_empty_folder_zip_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        build_dataset(folder(tmp_path / "empty"), paths_in(tmp_path))
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(DataError, match="no images"):
        build_dataset(folder(tmp_path / "empty.zip"), paths_in(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(folder(tmp_path / "missing"), paths_in(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="neither a directory nor a .zip"):
        build_dataset(folder(tmp_path / "file.txt"), paths_in(tmp_path))


@pytest.mark.parametrize("member", ["../x.png", "/tmp/abs_x.png", "a/../../x.png", "C:/x.png"])
def test_zip_members_escaping_the_archive_are_refused(tmp_path, member):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    work = tmp_path / "work"
    work.mkdir()
    zpath = work / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ok.png", png.getvalue())
        zf.writestr(member, png.getvalue())
    with pytest.raises(DataError, match="escapes the archive"):
        build_dataset(folder(zpath), paths_in(work))
    assert not (tmp_path / "x.png").exists() and not Path("/tmp/abs_x.png").exists()
    assert not (work / "prepared" / "f").exists()


# ----- config validation


def test_bad_data_params_are_one_line_errors(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: shapes\n  count: 10\n")
    cases = {
        "data.source=imagenet": "data.source: Input should be 'cifar10', 'folder' or 'shapes', got 'imagenet'",
        "data.image_size=30": "data.image_size: must be a positive multiple of 8",
        "data.image_size=0": "data.image_size: must be a positive multiple of 8",
        "data.on_bad_image=ignore": "data.on_bad_image: Input should be 'skip' or 'fail'",
        "data.name=../escape": "data.name: must be a plain folder name",
        "data.colour=red": "data.colour: unknown key",
        "data.count=0": "data.count: must be a positive number",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as exc:
            load_params(params, [override])
        assert message in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="folder source needs"):
        load_params(params, ["data.source=folder"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_params(params, ["data.count"])
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    assert load_params(params, ["data.count=7", "data.path=null"]).data.count == 7


# ----- the reader


def test_reader_scales_and_works_with_workers(tmp_path):
    build_dataset(shapes(count=20), paths_in(tmp_path))
    root = tmp_path / "prepared" / "s"
    raw = np.load(root / "images.npy")
    ds = PreparedDataset(root, verify=True)
    x = ds[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(to_uint8(x[None])[0], raw[3])

    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batches = torch.cat(list(loader))
    np.testing.assert_array_equal(to_uint8(batches), raw)


def test_reader_detects_tampering_and_missing_datasets(tmp_path):
    build_dataset(shapes(count=10), paths_in(tmp_path))
    root = tmp_path / "prepared" / "s"
    array = np.load(root / "images.npy", mmap_mode="r+")
    array[0, 0, 0, 0] ^= 1
    array.flush()
    del array
    with pytest.raises(DataError, match="sha256"):
        PreparedDataset(root, verify=True)
    with pytest.raises(DataError, match="run `ddim prepare` first"):
        PreparedDataset(tmp_path / "nothing")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["count"] = 11
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest says"):
        PreparedDataset(root)
