"""Read MNIST, Fashion-MNIST and CIFAR-10 from their canonical files with numpy (no torchvision).

Files live under a *data root* with one folder per dataset: ``mnist/`` and
``fashion-mnist/`` (the official ``*-idx?-ubyte.gz`` files, or the same names
un-gzipped) and ``cifar-10-batches-py/`` (the official python pickles, or the
``cifar-10-python.tar.gz`` archive beside it). Missing files are downloaded from
the datasets' official locations, and every file is checked against its published
MD5. Local copies that differ on purpose (ours of CIFAR-10 is rebuilt from JPEGs)
are accepted with ``verify=False`` (``--no-verify`` in the examples) or
``GRADWATCH_NO_VERIFY=1``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import functools
import importlib
import math
import os
import pickle
import shutil
import struct
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["DatasetError", "data_root", "load_mnist", "load_fashion_mnist", "load_cifar10", "read_idx"]


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt, fails its checksum, or could not be downloaded."""


MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar-10": ["https://www.cs.toronto.edu/~kriz/"],
}
"""Base URLs per dataset, tried in order; a file's URL is base + file name (tests point these at a local server)."""

MD5: dict[str, dict[str, str]] = {
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
    "cifar-10": {  # the archive and batch files as listed by torchvision's CIFAR10
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}
"""Published MD5s. Un-gzipped IDX files have none published, so only their headers are checked."""

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
NO_VERIFY_ENV = "GRADWATCH_NO_VERIFY"
DATA_ENV = "GRADWATCH_DATA"

_TIMEOUT_S = 60.0
_FIX = "delete it and run again to re-download, or copy a good file there"
_ESCAPE = f"pass verify=False (--no-verify in the examples) or set {NO_VERIFY_ENV}=1"
# Hashing 180 MB of CIFAR batches takes ~0.3 s; a script that loads train and test, or several
# scripts in one process, should pay it once. Keyed on size and mtime so a replaced file is re-hashed.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _urlopen(url: str, timeout: float) -> Any:
    """The one door to the network, so tests can monkeypatch it."""
    # Some hosts refuse urllib's default User-Agent with 403.
    request = urllib.request.Request(url, headers={"User-Agent": "gradwatch-examples"})
    return urllib.request.urlopen(request, timeout=timeout)


# ----------------------------------------------------------------------------- paths and checksums
def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding one sub-folder per dataset: ``data_dir``, else ``$GRADWATCH_DATA``, else ``./data``."""
    if data_dir is not None:
        chosen = Path(data_dir)
    else:
        # An empty variable counts as unset, as shells make it easy to export one by accident.
        env = os.environ.get(DATA_ENV, "")
        chosen = Path(env) if env else Path("data")
    # Absolute, so error messages say exactly where files were looked for.
    return chosen.expanduser().absolute()


def _verification_off(verify: bool) -> bool:
    return not verify or os.environ.get(NO_VERIFY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _md5(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def _mismatch(path: Path, expected: str, verify: bool) -> str | None:
    """Why ``path`` fails its published MD5, or None when it matches (or checking is off / unknown)."""
    if not expected or _verification_off(verify):
        return None
    actual = _md5(path)
    return None if actual == expected else f"MD5 {actual}, expected the official {expected}"


def _check_md5(path: Path, expected: str | None, verify: bool) -> None:
    problem = _mismatch(path, expected or "", verify)
    if problem:
        raise DatasetError(
            f"{path}: checksum mismatch: {problem}. If the file is corrupt, {_FIX}. "
            f"To use a local copy that differs on purpose, {_ESCAPE}.")


# ----------------------------------------------------------------------------- downloads
def _fetch(url: str, dest: BinaryIO) -> None:
    """Copy ``url`` into ``dest``; raise OSError when the body is shorter than announced."""
    with _urlopen(url, _TIMEOUT_S) as response:
        # http.client ends a short body silently, so compare with Content-Length ourselves.
        headers = getattr(response, "headers", None)
        announced = headers.get("Content-Length") if headers is not None else None
        received = 0
        for chunk in iter(lambda: response.read(1 << 20), b""):
            dest.write(chunk)
            received += len(chunk)
    if announced is not None and announced.isdigit() and received != int(announced):
        raise OSError(f"incomplete transfer: {received} of {announced} bytes")


def _try_mirror(url: str, target: Path, expected: str, verify: bool) -> str | None:
    """Download ``url`` to ``target`` via a temporary file; None on success, else why it failed."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise DatasetError(f"cannot write into {target.parent}: {exc}") from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                _fetch(url, f)
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            return str(getattr(exc, "reason", None) or exc) or type(exc).__name__
        problem = _mismatch(tmp, expected, verify)
        if problem:
            return f"downloaded file has {problem}"
        tmp.chmod(0o644)  # mkstemp makes it private; a shared data folder needs it readable by all
        tmp.replace(target)  # atomic: the real name only ever holds a complete, verified file
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _download(dataset: str, name: str, folder: Path, verify: bool) -> Path:
    """Fetch ``name`` into ``folder`` from the first mirror that serves a good copy."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create {folder} to download {name} into: {exc}") from None
    target = folder / name
    tried = []
    for base in MIRRORS[dataset]:
        url = base + name
        print(f"downloading {url} -> {target}", file=sys.stderr)
        problem = _try_mirror(url, target, MD5[dataset].get(name, ""), verify)
        if problem is None:
            return target
        tried.append(f"{url} ({problem})")
    hint = f" If you trust a copy that fails the checksum, {_ESCAPE}." if any("MD5" in t for t in tried) else ""
    raise DatasetError(
        f"could not download {name}; tried: {'; '.join(tried) or 'no mirrors configured'}. "
        f"The file belongs in {folder}: you can download it elsewhere and put it there by hand "
        f"(or point --data-dir / {DATA_ENV} at a data root that has it).{hint}")


# ----------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name says:
    browsers often un-gzip downloads but keep the .gz name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except FileNotFoundError:
        raise DatasetError(f"missing {path}: put the file in {path.parent}") from None
    except (OSError, EOFError, zlib.error) as exc:  # EOFError: truncated gzip stream
        raise DatasetError(f"{path}: cannot be read or un-gzipped ({exc}); {_FIX}") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a native-endian array, checking its header against its length."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0:2] != b"\x00\x00":
        raise DatasetError(f"{path}: not an IDX file (bad magic number 0x{data[:4].hex()}); {_FIX}")
    if data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type code 0x{data[2]:02x}; {_FIX}")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DatasetError(f"{path}: truncated or invalid IDX header ({ndim} dimensions); {_FIX}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header cannot overflow
    if len(data) - header != expected:
        raise DatasetError(
            f"{path}: holds {len(data) - header} bytes of data but its header declares shape {shape} "
            f"({expected} bytes), so the file is truncated or corrupt; {_FIX}")
    # astype copies: the result is native-endian and writable (torch.from_numpy warns on read-only arrays).
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(dataset: str, name: str, folder: Path, download: bool, verify: bool) -> Path:
    """Path of ``name`` (a .gz) or its un-gzipped twin, downloading the .gz when neither is there."""
    gz, raw = folder / name, folder / name[: -len(".gz")]
    if gz.exists():
        _check_md5(gz, MD5[dataset].get(name), verify)
        return gz
    if raw.exists():
        return raw  # no published MD5 for un-gzipped files; read_idx still checks the header and length
    if not download:
        raise DatasetError(f"missing {gz} (or {raw.name}): put the official file in {folder}, point --data-dir "
                           f"(or GRADWATCH_DATA) at the folder holding {folder.name}/, or allow downloading (drop "
                           f"--no-download)")
    return _download(dataset, name, folder, verify)


def _check_labels(path: Path, labels: np.ndarray, n: int) -> None:
    if labels.ndim != 1 or len(labels) != n:
        raise DatasetError(f"{path}: {labels.shape} labels for {n} images; {_FIX}")
    if n and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels outside 0..9; {_FIX}")


def _load_idx_pair(dataset: str, data_dir: str | os.PathLike[str] | None, train: bool, download: bool,
                   verify: bool) -> tuple[np.ndarray, np.ndarray]:
    folder = data_root(data_dir) / dataset
    prefix = "train" if train else "t10k"
    images_path = _idx_file(dataset, f"{prefix}-images-idx3-ubyte.gz", folder, download, verify)
    labels_path = _idx_file(dataset, f"{prefix}-labels-idx1-ubyte.gz", folder, download, verify)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path}: {images.dtype} images of shape {images.shape}, "
                           f"expected uint8 (N, 28, 28); {_FIX}")
    _check_labels(labels_path, labels, len(images))
    return images, labels.astype(np.int64)


def load_mnist(data_dir: str | os.PathLike[str] | None = None, *, train: bool = True, download: bool = True,
               verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images uint8 (N, 28, 28) and labels int64 (N,), from ``<root>/mnist/`` (downloaded if missing)."""
    return _load_idx_pair("mnist", data_dir, train, download, verify)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None, *, train: bool = True,
                       download: bool = True, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images uint8 (N, 28, 28) and labels int64 (N,), from ``<root>/fashion-mnist/``."""
    return _load_idx_pair("fashion-mnist", data_dir, train, download, verify)


# ----------------------------------------------------------------------------- CIFAR-10
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 protocol-2 pickles spell bytes (array buffers); any other codec is refused."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing to decode with codec {encoding!r}")
    return text.encode("latin1")


@functools.lru_cache(maxsize=None)
def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR-10 batch pickle may name: numpy arrays (under numpy 1 and 2 module names)
    and the latin-1 encoding of bytes."""
    try:  # numpy 2 renamed numpy.core to numpy._core; importing the old name there warns
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol-5 pickles of arrays
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only plain data and numpy arrays: a downloaded (or unverified) pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _numpy_globals()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) from one batch pickle, with b"" or str keys."""
    fix = "delete the folder and run again to re-extract or re-download it"
    try:
        with open(path, "rb") as f:
            # encoding="bytes" reads the official Python 2 pickles (their str become bytes keys).
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
        labels = np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64)
    except FileNotFoundError:
        raise DatasetError(f"missing {path}: the CIFAR-10 folder {path.parent} is incomplete; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise DatasetError(f"{path}: not a CIFAR-10 batch ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: its data is not a uint8 (N, 3072) array; {fix}")
    _check_labels(path, labels, len(data))
    return data, labels


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    parts = Path(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or not (member.isfile() or member.isdir()):
        raise DatasetError(f"{archive}: refusing to extract {member.name!r} (an absolute path, a path with "
                           f"'..', or a link/device); {_FIX}")


def _safe_extract(archive: Path, root: Path) -> None:
    """Extract ``archive``'s cifar-10-batches-py/ into ``root``, refusing any member that could escape it."""
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".cifar-extract-"))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for member in members:  # check all before writing anything
                    _check_member(archive, member)
                # The "data" filter (Python >= 3.11.4/3.12) re-checks the same things inside tarfile.
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(scratch, members=members, **extra)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{archive}: cannot be extracted ({exc}); {_FIX}") from None
        if not (scratch / CIFAR_FOLDER).is_dir():
            raise DatasetError(f"{archive}: has no {CIFAR_FOLDER}/ folder; {_FIX}")
        # Renamed only when complete, so an interrupted extraction never leaves a half folder.
        try:
            (scratch / CIFAR_FOLDER).replace(root / CIFAR_FOLDER)
        except OSError as exc:
            if not (root / CIFAR_FOLDER).is_dir():  # else another process extracted it meanwhile: use theirs
                raise DatasetError(f"cannot create {root / CIFAR_FOLDER}: {exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ensure_cifar_folder(root: Path, download: bool, verify: bool) -> Path:
    folder = root / CIFAR_FOLDER
    if folder.is_dir():
        return folder
    archive = root / CIFAR_ARCHIVE
    if archive.exists():
        _check_md5(archive, MD5["cifar-10"][CIFAR_ARCHIVE], verify)
    elif download:
        archive = _download("cifar-10", CIFAR_ARCHIVE, root, verify)
    else:
        raise DatasetError(f"missing {folder} (and {archive}): put the CIFAR-10 python version in {root}, point "
                           f"--data-dir (or GRADWATCH_DATA) at the folder holding it, or allow downloading (drop "
                           f"--no-download)")
    _safe_extract(archive, root)
    return folder


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, *, train: bool = True, download: bool = True,
                 verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images uint8 (N, 32, 32, 3) HWC and labels int64 (N,), from ``<root>/cifar-10-batches-py/``
    (extracted from ``<root>/cifar-10-python.tar.gz``, or downloaded, if missing)."""
    folder = _ensure_cifar_folder(data_root(data_dir), download, verify)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        if path.exists():
            _check_md5(path, MD5["cifar-10"].get(name), verify)
        data, labels = _read_cifar_batch(path)
        xs.append(data.reshape(-1, 3, 32, 32))  # each row is one image, channel-major (CHW)
        ys.append(labels)
    # HWC as a transposed view, not a copy: it saves 0.2 s, and torch's .permute(0, 3, 1, 2) of it
    # is then a contiguous NCHW tensor for free.
    return np.concatenate(xs).transpose(0, 2, 3, 1), np.concatenate(ys)
