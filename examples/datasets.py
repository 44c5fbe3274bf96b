"""Read MNIST, Fashion-MNIST and CIFAR-10 from their canonical files with numpy (no torchvision).

Files live under a *data root* with one folder per dataset: ``mnist/``,
``fashion-mnist/`` (the official ``*-idx?-ubyte.gz`` files) and
``cifar-10-batches-py/`` (the official python pickles). Missing files are downloaded
from the datasets' official locations; every file is checked against its published
MD5. Local copies that differ on purpose (our CIFAR-10 is rebuilt from JPEGs) are
accepted with ``verify=False`` (``--no-verify``) or ``GRADWATCH_NO_VERIFY=1``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt, fails its checksum, or could not be downloaded."""


MIRRORS: Dict[str, List[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar-10": ["https://www.cs.toronto.edu/~kriz/"],
}
"""Base URLs tried in order (tests point these at a local server)."""

MD5: Dict[str, Dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar-10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}
"""Published MD5 checksums (MNIST/Fashion: the official pages; CIFAR-10: the official archive and batches)."""

_VERIFIED: set = set()  # files already checked in this process


def _urlopen(url: str, timeout: float):
    """The one door to the network (tests monkeypatch it)."""
    return urllib.request.urlopen(url, timeout=timeout)


def data_root(data_dir: Optional[PathLike] = None) -> Path:
    """Argument, else ``$GRADWATCH_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("GRADWATCH_DATA")
    return Path(env) if env else Path("data")


def _skip_verify(verify: bool) -> bool:
    return not verify or os.environ.get("GRADWATCH_NO_VERIFY", "") not in ("", "0")


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path: Path, expected: Optional[str], verify: bool = True) -> None:
    """Raise DatasetError when ``path`` does not have the published checksum."""
    if expected is None or _skip_verify(verify) or (path, expected) in _VERIFIED:
        return
    actual = md5sum(path)
    if actual != expected:
        raise DatasetError(
            f"{path}: MD5 {actual} does not match the official {expected}. If the file is corrupt, delete it and "
            f"run again to re-download it. To use a local copy that differs on purpose, pass verify=False "
            f"(--no-verify in the examples) or set GRADWATCH_NO_VERIFY=1.")
    _VERIFIED.add((path, expected))


# ------------------------------------------------------------------------- IDX (MNIST-style)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw), validating its header against its length."""
    path = Path(path)
    fix = "delete it and run again to re-download, or copy a good file there"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot be read ({exc}); {fix}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {data[:4].hex()}); {fix}")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header; {fix}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: holds {len(data) - header} bytes of data but its header declares {shape} "
                           f"({expected} bytes): the file is truncated or corrupt; {fix}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _download(dataset: str, name: str, folder: Path, verify: bool, timeout: float = 60.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    errors = []
    for base in MIRRORS[dataset]:
        url = base + name
        try:
            with _urlopen(url, timeout) as response, tempfile.NamedTemporaryFile(
                    dir=folder, prefix=f".{name}.", delete=False) as tmp:
                shutil.copyfileobj(response, tmp)
            tmp_path = Path(tmp.name)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{url} ({exc})")
            continue
        try:
            check_md5(tmp_path, MD5[dataset].get(name), verify)
        except DatasetError:
            tmp_path.unlink(missing_ok=True)
            errors.append(f"{url} (checksum mismatch)")
            continue
        tmp_path.replace(target)  # only a complete, verified file gets the real name
        return target
    raise DatasetError(f"could not download {name}: tried {'; '.join(errors)}. Put the file in {folder} by hand "
                       f"(or point --data-dir / GRADWATCH_DATA at a folder that has it).")


def _idx_file(dataset: str, name: str, folder: Path, download: bool, verify: bool) -> Path:
    gz, raw = folder / name, folder / name[:-3]
    if gz.exists():
        check_md5(gz, MD5[dataset].get(name), verify)
        return gz
    if raw.exists():
        return raw  # un-gzipped copies have no published checksum; the header check still applies
    if not download:
        raise DatasetError(f"missing {gz}: put the official file in {folder}, or allow downloading")
    return _download(dataset, name, folder, verify)


def _load_idx_pair(dataset: str, data_dir: Optional[PathLike], train: bool, download: bool,
                   verify: bool) -> Tuple[np.ndarray, np.ndarray]:
    folder = data_root(data_dir) / dataset
    prefix = "train" if train else "t10k"
    images = read_idx(_idx_file(dataset, f"{prefix}-images-idx3-ubyte.gz", folder, download, verify))
    labels = read_idx(_idx_file(dataset, f"{prefix}-labels-idx1-ubyte.gz", folder, download, verify))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return images.astype(np.uint8), labels.astype(np.int64)


def load_mnist(data_dir: Optional[PathLike] = None, *, train: bool = True, download: bool = True,
               verify: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """MNIST images uint8 (N, 28, 28) and labels int64 (N,)."""
    return _load_idx_pair("mnist", data_dir, train, download, verify)


def load_fashion_mnist(data_dir: Optional[PathLike] = None, *, train: bool = True, download: bool = True,
                       verify: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images uint8 (N, 28, 28) and labels int64 (N,)."""
    return _load_idx_pair("fashion-mnist", data_dir, train, download, verify)


# ------------------------------------------------------------------------- CIFAR-10
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


def _safe_extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep) or member.issym() or member.islnk():
                raise DatasetError(f"{archive}: refusing to extract {member.name!r} (outside {dest} or a link)")
        tar.extractall(dest)


def load_cifar10(data_dir: Optional[PathLike] = None, *, train: bool = True, download: bool = True,
                 verify: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images uint8 (N, 32, 32, 3) HWC and labels int64 (N,)."""
    root = data_root(data_dir)
    folder = root / CIFAR_FOLDER
    if not folder.exists():
        archive = root / CIFAR_ARCHIVE
        if archive.exists():
            check_md5(archive, MD5["cifar-10"][CIFAR_ARCHIVE], verify)
        elif download:
            archive = _download("cifar-10", CIFAR_ARCHIVE, root, verify)
        else:
            raise DatasetError(f"missing {folder} (and {archive}): put the official CIFAR-10 python version there, "
                               f"or allow downloading")
        _safe_extract(archive, root)
    names: Sequence[str] = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.exists():
            raise DatasetError(f"missing {path}: the CIFAR-10 folder {folder} is incomplete; delete it and run again")
        check_md5(path, MD5["cifar-10"].get(name), verify)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise DatasetError(f"{path}: not a CIFAR-10 batch ({type(exc).__name__}: {exc}); delete it and run "
                               f"again to re-download") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DatasetError(f"{path}: data {data.shape} / labels {labels.shape} are not CIFAR-10's layout")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)
