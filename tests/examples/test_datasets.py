"""examples/datasets.py on small generated files in the real formats; downloads only from a local server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
import types
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest

from examples import datasets
from examples.datasets import DatasetError

N = 5  # images per generated file: enough to catch reshaping mistakes, small enough to be instant


# ----------------------------------------------------------------------------- generated files
def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """The IDX layout: 0, 0, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes()


def write_idx_set(folder: Path, gz: bool = True, seed: int = 0) -> dict:
    """train and t10k image/label files, as the official names (or un-gzipped twins); returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", N), ("t10k", N - 2)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            raw = idx_bytes(arr)
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw)) if gz else (folder / name).write_bytes(raw)
        arrays[prefix] = (images, labels)
    return arrays


def trust(monkeypatch, folder: Path, dataset: str) -> None:
    """Make the generated files the 'official' ones, so verify=True passes on them."""
    table = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
    monkeypatch.setitem(datasets.MD5, dataset, table)


def cifar_batch(n: int, seed: int, **dump) -> tuple[np.ndarray, list, bytes]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    batch = {b"batch_label": b"generated", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
    return data, labels, pickle.dumps(batch, **dump)


def write_cifar(folder: Path, n: int = 3) -> dict:
    """cifar-10-batches-py/ with five tiny training batches and a test batch; returns {name: (data, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels, blob = cifar_batch(n, seed=k)
        (folder / name).write_bytes(blob)
        out[name] = (data, labels)
    return out


def hwc(rows: np.ndarray) -> np.ndarray:
    """What a CIFAR row (R plane, G plane, B plane) should come back as, computed pixel by pixel."""
    return np.stack([rows[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)], axis=-1)


def tar_cifar(archive: Path, batches_folder: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches_folder, arcname="cifar-10-batches-py")


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """No user settings, an empty checksum cache, and no way to reach anything but 127.0.0.1."""
    monkeypatch.delenv("GRADWATCH_DATA", raising=False)
    monkeypatch.delenv("GRADWATCH_NO_VERIFY", raising=False)
    monkeypatch.setattr(datasets, "_MD5_CACHE", {})
    real = datasets._urlopen

    def local_only(url, timeout):
        if not url.startswith("http://127.0.0.1:"):
            raise AssertionError(f"a test tried to reach {url}")
        return real(url, timeout)

    monkeypatch.setattr(datasets, "_urlopen", local_only)


@pytest.fixture
def server(tmp_path, request):
    """A real HTTP server on 127.0.0.1 serving tmp_path/'served'. Paths under /short/ announce 100 more
    bytes than they send (a dropped connection). Shut down by a finalizer whatever the test does."""
    root = tmp_path / "served"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def do_GET(self):
            if not self.path.startswith("/short/"):
                return super().do_GET()
            body = (root / self.path[len("/short/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 100))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    request.addfinalizer(stop)
    return root, f"http://127.0.0.1:{httpd.server_address[1]}/"


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("loader,folder", [(datasets.load_mnist, "mnist"),
                                           (datasets.load_fashion_mnist, "fashion-mnist")])
def test_idx_round_trip_with_verified_checksums(tmp_path, monkeypatch, loader, folder):
    arrays = write_idx_set(tmp_path / folder)
    trust(monkeypatch, tmp_path / folder, folder)
    for train, prefix in ((True, "train"), (False, "t10k")):
        x, y = loader(tmp_path, train=train, download=False)
        assert x.dtype == np.uint8 and x.shape == (len(arrays[prefix][0]), 28, 28)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        np.testing.assert_array_equal(x, arrays[prefix][0])
        np.testing.assert_array_equal(y, arrays[prefix][1])
        assert x.flags.writeable  # torch.from_numpy warns on read-only arrays


def test_read_idx_other_dtypes_come_back_native_endian(tmp_path):
    for code, arr in ((0x0C, np.array([[1, -2], [70000, 3]], np.int32)), (0x0D, np.array([0.5, -1.25], np.float32))):
        path = tmp_path / "x.idx"
        path.write_bytes(idx_bytes(arr, code))
        out = datasets.read_idx(path)
        assert out.dtype.isnative and out.dtype.kind == arr.dtype.kind
        np.testing.assert_array_equal(out, arr)


def test_un_gzipped_files_are_accepted(tmp_path):
    arrays = write_idx_set(tmp_path / "fashion-mnist", gz=False)
    x, y = datasets.load_fashion_mnist(tmp_path, download=False)  # no published MD5 for these: no check
    np.testing.assert_array_equal(x, arrays["train"][0])
    np.testing.assert_array_equal(y, arrays["train"][1])


def test_a_gz_name_holding_raw_idx_is_read(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"  # as browsers leave it: un-gzipped, name kept
    path.write_bytes(idx_bytes(np.arange(4)))
    np.testing.assert_array_equal(datasets.read_idx(path), np.arange(4))


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert datasets.data_root() == tmp_path / "data"  # default: ./data, made absolute
    monkeypatch.setenv("GRADWATCH_DATA", "")
    assert datasets.data_root() == tmp_path / "data"  # empty variable = unset
    monkeypatch.setenv("GRADWATCH_DATA", str(tmp_path / "env"))
    assert datasets.data_root() == tmp_path / "env"
    assert datasets.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert datasets.data_root("rel") == tmp_path / "rel"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.data_root("~/d") == tmp_path / "home" / "d"


def test_the_loader_uses_the_env_root(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path / "env" / "mnist", gz=False)
    monkeypatch.setenv("GRADWATCH_DATA", str(tmp_path / "env"))
    np.testing.assert_array_equal(datasets.load_mnist(download=False)[0], arrays["train"][0])


FIX = "delete it and run again to re-download, or copy a good file there"
GOOD = idx_bytes(np.zeros((3, 4), np.uint8))


@pytest.mark.parametrize("content,what", [
    (GOOD[:-2], "truncated"),
    (GOOD + b"\x00", "truncated or corrupt"),  # too long is as wrong as too short
    (GOOD[:10], "truncated"),  # cut inside the dims
    (b"\x12\x34\x08\x01" + b"\x00" * 8, "magic"),
    (b"\x00\x00\x07\x01" + b"\x00" * 8, "data type"),
    (gzip.compress(GOOD)[:-12], "un-gzipped"),  # gzip stream cut short
    (b"", "magic"),
])
def test_bad_idx_files_name_the_file_and_the_fix(tmp_path, content, what):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=what) as err:
        datasets.read_idx(path)
    assert str(path) in str(err.value) and FIX in str(err.value)


def test_wrong_image_shape_or_label_count_is_refused(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_set(folder, gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2)))  # 3 images, 2 labels
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.*labels for 3 images"):
        datasets.load_mnist(tmp_path, train=False, download=False)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((N, 8, 8))))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.*\(N, 28, 28\)"):
        datasets.load_mnist(tmp_path, download=False)


def test_missing_files_without_download_name_the_file_and_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(tmp_path, download=False)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in str(err.value)
    assert "put the official file in" in str(err.value)
    assert "--data-dir" in str(err.value) and "--no-download" in str(err.value)  # the options that decide it


# ----------------------------------------------------------------------------- checksums
def test_checksum_mismatch_names_both_md5s_and_the_escape_hatches(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "mnist")  # the real table's MD5s cannot match generated files
    name = "train-images-idx3-ubyte.gz"
    actual = hashlib.md5((tmp_path / "mnist" / name).read_bytes()).hexdigest()
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(tmp_path, download=False)
    msg = str(err.value)
    for part in (str(tmp_path / "mnist" / name), actual, datasets.MD5["mnist"][name], "verify=False",
                 "--no-verify", "GRADWATCH_NO_VERIFY=1"):
        assert part in msg
    assert datasets.load_mnist(tmp_path, download=False, verify=False)[0].shape == (N, 28, 28)
    monkeypatch.setenv("GRADWATCH_NO_VERIFY", "0")  # "0" means verify
    with pytest.raises(DatasetError, match="checksum mismatch"):
        datasets.load_mnist(tmp_path, download=False)
    monkeypatch.setenv("GRADWATCH_NO_VERIFY", "1")
    assert datasets.load_mnist(tmp_path, download=False)[0].shape == (N, 28, 28)


def test_each_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    folder = tmp_path / "mnist"
    write_idx_set(folder)
    trust(monkeypatch, folder, "mnist")
    calls = []

    def counting_md5(*a):
        calls.append(1)
        return hashlib.md5(*a)

    monkeypatch.setattr(datasets, "hashlib", types.SimpleNamespace(md5=counting_md5))
    datasets.load_mnist(tmp_path, download=False)
    datasets.load_mnist(tmp_path, download=False)
    assert len(calls) == 2  # images and labels, once each
    target = folder / "train-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(idx_bytes(np.full(N, 9))))  # replaced by something else
    os.utime(target, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: checksum mismatch"):
        datasets.load_mnist(tmp_path, download=False)


# ----------------------------------------------------------------------------- downloads
def test_download_from_a_local_server(tmp_path, monkeypatch, server):
    served, url = server
    arrays = write_idx_set(served)
    trust(monkeypatch, served, "mnist")
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [url + "missing/", url])  # the first mirror 404s
    x, y = datasets.load_mnist(tmp_path / "data", train=True)
    np.testing.assert_array_equal(x, arrays["train"][0])
    np.testing.assert_array_equal(y, arrays["train"][1])
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # no temporary files left
    x2, _ = datasets.load_mnist(tmp_path / "data", train=True, download=False)  # now local
    np.testing.assert_array_equal(x2, x)


def test_a_download_failing_its_checksum_is_not_kept(tmp_path, monkeypatch, server):
    served, url = server
    write_idx_set(served)  # not trusted: the official MD5s cannot match
    monkeypatch.setitem(datasets.MIRRORS, "fashion-mnist", [url])
    folder = tmp_path / "fashion-mnist"
    with pytest.raises(DatasetError, match="MD5") as err:
        datasets.load_fashion_mnist(tmp_path)
    assert url + "train-images-idx3-ubyte.gz" in str(err.value) and "verify=False" in str(err.value)
    assert list(folder.iterdir()) == []
    assert datasets.load_fashion_mnist(tmp_path, verify=False)[0].shape == (N, 28, 28)


def test_failed_download_names_url_and_folder(tmp_path, monkeypatch, server):
    served, url = server
    monkeypatch.setitem(datasets.MIRRORS, "fashion-mnist", [url])  # nothing served: 404
    with pytest.raises(DatasetError) as err:
        datasets.load_fashion_mnist(tmp_path)
    msg = str(err.value)
    assert url + "train-images-idx3-ubyte.gz" in msg and "404" in msg
    assert str(tmp_path / "fashion-mnist") in msg and "by hand" in msg
    assert list((tmp_path / "fashion-mnist").iterdir()) == []


def test_a_short_transfer_is_an_error_and_leaves_nothing(tmp_path, monkeypatch, server):
    served, url = server
    write_idx_set(served)
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [url + "short/"])
    with pytest.raises(DatasetError, match="incomplete") as err:
        datasets.load_mnist(tmp_path, verify=False)  # even unverified, a cut file is refused
    assert url + "short/train-images-idx3-ubyte.gz" in str(err.value)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_network_errors_name_every_url_tried_and_the_folder(tmp_path, monkeypatch):
    tried = []

    def refuse(url, timeout):
        tried.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets, "_urlopen", refuse)
    monkeypatch.setitem(datasets.MIRRORS, "mnist", ["http://a.invalid/", "http://b.invalid/"])
    with pytest.raises(DatasetError) as err:
        datasets.load_mnist(tmp_path)
    msg = str(err.value)
    assert tried == ["http://a.invalid/train-images-idx3-ubyte.gz", "http://b.invalid/train-images-idx3-ubyte.gz"]
    assert all(u in msg for u in tried) and "no network" in msg
    assert str(tmp_path / "mnist") in msg and "by hand" in msg


# ----------------------------------------------------------------------------- CIFAR-10
def test_cifar_batches_round_trip(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder)
    trust(monkeypatch, folder, "cifar-10")
    x, y = datasets.load_cifar10(tmp_path, download=False)
    assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(x, hwc(np.concatenate([d for d, _ in train])))
    assert y.tolist() == sum((labels for _, labels in train), [])
    x, y = datasets.load_cifar10(tmp_path, train=False, download=False)
    np.testing.assert_array_equal(x, hwc(written["test_batch"][0]))
    assert y.tolist() == written["test_batch"][1]


def test_cifar_pickles_in_other_dialects_load(tmp_path):
    """Official files are Python 2 pickles naming numpy.core; users' own may be protocol 5 with str keys."""
    folder = tmp_path / "cifar-10-batches-py"
    data, labels, blob = cifar_batch(2, seed=7, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 1 / official spelling
    (folder).mkdir()
    (folder / "test_batch").write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 must not warn about the old module name
        x, y = datasets.load_cifar10(tmp_path, train=False, download=False, verify=False)
    np.testing.assert_array_equal(x, hwc(data))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": np.array(labels)}, protocol=5))
    x, y = datasets.load_cifar10(tmp_path, train=False, download=False, verify=False)
    np.testing.assert_array_equal(x, hwc(data))
    assert y.tolist() == labels


class _Trap:  # a pickle that would create a folder when loaded by plain pickle.load
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Trap(marker), b"labels": []}))
    with pytest.raises(DatasetError, match="test_batch.*not a CIFAR-10 batch.*refusing to load"):
        datasets.load_cifar10(tmp_path, train=False, download=False, verify=False)
    assert not marker.exists()


def test_cifar_checksum_mismatch_and_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    with pytest.raises(DatasetError, match="data_batch_1: checksum mismatch.*c99cafc152244af753f735de768cd75f"
                                           ".*--no-verify.*GRADWATCH_NO_VERIFY"):
        datasets.load_cifar10(tmp_path, download=False)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="missing .*data_batch_4.*incomplete"):
        datasets.load_cifar10(tmp_path, download=False, verify=False)


def test_cifar_missing_without_download_names_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        datasets.load_cifar10(tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert str(tmp_path / "cifar-10-python.tar.gz") in str(err.value)


def test_cifar_archive_is_extracted(tmp_path, monkeypatch):
    written = write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    root = tmp_path / "root"
    root.mkdir()
    tar_cifar(root / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz: checksum mismatch"):
        datasets.load_cifar10(root, download=False)  # the archive is checked before extracting
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]
    monkeypatch.setenv("GRADWATCH_NO_VERIFY", "1")
    x, _ = datasets.load_cifar10(root, train=False, download=False)
    np.testing.assert_array_equal(x, hwc(written["test_batch"][0]))
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar_download_from_a_local_server(tmp_path, monkeypatch, server):
    served, url = server
    written = write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    tar_cifar(served / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    monkeypatch.setitem(datasets.MIRRORS, "cifar-10", [url])
    x, y = datasets.load_cifar10(tmp_path / "data", train=False, verify=False)
    np.testing.assert_array_equal(x, hwc(written["test_batch"][0]))
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()


def add_member(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(b"x") if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("name,kind,link", [
    ("../evil", tarfile.REGTYPE, ""),
    ("cifar-10-batches-py/../../evil", tarfile.REGTYPE, ""),
    ("{tmp}/evil", tarfile.REGTYPE, ""),  # absolute, into the test's own folder
    ("cifar-10-batches-py/test_batch", tarfile.SYMTYPE, "/etc/passwd"),
])
def test_cifar_archive_members_that_could_escape_are_refused(tmp_path, name, kind, link):
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/data_batch_1")  # a harmless member first: nothing is written
        add_member(tar, name.format(tmp=tmp_path), kind, link)
    with pytest.raises(DatasetError, match="refusing to extract"):
        datasets.load_cifar10(root, verify=False, download=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]  # no half folder, no scratch


def test_a_corrupt_cifar_archive_is_explained(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz: cannot be extracted.*delete it"):
        datasets.load_cifar10(tmp_path, verify=False, download=False)
