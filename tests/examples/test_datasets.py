"""The examples' data module, on small generated files in the real formats (never the internet)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from examples import datasets
from examples.datasets import DatasetError


def idx_bytes(arr: np.ndarray) -> bytes:
    code = 0x08
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n: int = 6, gz: bool = True) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return images, labels


def trust(monkeypatch, folder: Path, dataset: str) -> None:
    """Make the generated files the 'official' ones."""
    table = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
    monkeypatch.setitem(datasets.MD5, dataset, table)
    datasets._VERIFIED.clear()


def test_mnist_round_trip(tmp_path, monkeypatch):
    images, labels = write_mnist(tmp_path / "mnist")
    trust(monkeypatch, tmp_path / "mnist", "mnist")
    x, y = datasets.load_mnist(tmp_path, train=False, download=False)
    assert x.dtype == np.uint8 and x.shape == (6, 28, 28) and y.dtype == np.int64
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_raw_idx_files_are_accepted(tmp_path):
    images, _ = write_mnist(tmp_path / "fashion-mnist", gz=False)
    x, _ = datasets.load_fashion_mnist(tmp_path, download=False)
    np.testing.assert_array_equal(x, images)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_DATA", str(tmp_path / "env"))
    assert datasets.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert datasets.data_root() == tmp_path / "env"
    monkeypatch.delenv("GRADWATCH_DATA")
    assert datasets.data_root() == Path("data")


def test_truncated_and_bad_magic_name_the_file(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(idx_bytes(np.zeros((3, 4), np.uint8))[:-2])
    with pytest.raises(DatasetError, match=r"t\.idx.*truncated"):
        datasets.read_idx(path)
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetError, match=r"t\.idx.*magic"):
        datasets.read_idx(path)


def test_checksum_mismatch_and_its_escape_hatches(tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist")  # the real table's MD5s cannot match generated files
    datasets._VERIFIED.clear()
    with pytest.raises(DatasetError, match="verify=False.*GRADWATCH_NO_VERIFY") as err:
        datasets.load_mnist(tmp_path, download=False)
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert datasets.load_mnist(tmp_path, download=False, verify=False)[0].shape == (6, 28, 28)
    monkeypatch.setenv("GRADWATCH_NO_VERIFY", "1")
    assert datasets.load_mnist(tmp_path, download=False)[0].shape == (6, 28, 28)


def test_missing_files_without_download_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"missing .*mnist"):
        datasets.load_mnist(tmp_path, download=False)


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/'served'; always shut down."""
    root = tmp_path / "served"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_download_from_a_local_server(tmp_path, monkeypatch, server):
    root, url = server
    images, _ = write_mnist(root)
    trust(monkeypatch, root, "mnist")
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [url + "missing/", url])  # first mirror 404s
    x, _ = datasets.load_mnist(tmp_path / "data", train=True)
    np.testing.assert_array_equal(x, images)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_failed_download_names_url_and_folder(tmp_path, monkeypatch, server):
    _, url = server
    monkeypatch.setitem(datasets.MIRRORS, "fashion-mnist", [url])
    with pytest.raises(DatasetError, match=r"127\.0\.0\.1.*by hand") as err:
        datasets.load_fashion_mnist(tmp_path)
    assert str(tmp_path / "fashion-mnist") in str(err.value)

    def refuse(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets, "_urlopen", refuse)
    monkeypatch.setitem(datasets.MIRRORS, "fashion-mnist", ["http://example.invalid/"])
    with pytest.raises(DatasetError, match="example.invalid.*no network"):
        datasets.load_fashion_mnist(tmp_path)


def write_cifar(folder: Path, n: int = 4) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n))}, f)
    return data


def test_cifar_batches_and_archive(tmp_path):
    data = write_cifar(tmp_path / "a" / "cifar-10-batches-py")
    x, y = datasets.load_cifar10(tmp_path / "a", verify=False, download=False)
    assert x.shape == (20, 32, 32, 3) and y.tolist()[:4] == [0, 1, 2, 3]
    np.testing.assert_array_equal(x[0], data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    archive = tmp_path / "b" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "a" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    x, _ = datasets.load_cifar10(tmp_path / "b", train=False, verify=False, download=False)
    assert x.shape == (4, 32, 32, 3)


def test_cifar_archive_with_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DatasetError, match="refusing"):
        datasets.load_cifar10(tmp_path, verify=False, download=False)
    assert not (tmp_path.parent / "evil").exists()


def test_cifar_checksum_mismatch_is_explained(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    datasets._VERIFIED.clear()
    with pytest.raises(DatasetError, match="data_batch_1.*--no-verify"):
        datasets.load_cifar10(tmp_path, download=False)
