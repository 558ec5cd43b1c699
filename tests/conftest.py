"""Shared fixtures and helpers for the test suite.

Every test runs on the CPU with tiny data: synthetic IDX files for the data chain, and a few
hundred real MNIST images (the repository's data/ folder) for anything that trains.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
import shlex
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from support import mnist_files  # noqa: E402

# The trainings here are a few batches of a tiny model: more threads would not help them, and
# one thread leaves the machine to whatever else runs on it. (train.py subprocesses get
# OMP_NUM_THREADS=1 from test_cli.py.)
torch.set_num_threads(1)

# train.py's hints name `python` where PATH finds the interpreter that ran it: the suite runs
# as a user with the venv activated, so that a hint reads as the README's `python train.py`
# (tests/test_suggested_commands.py runs one where PATH does not find it).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable),
                                      os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def signals_restored() -> Iterator[dict]:
    """train.main installs SIGINT/SIGTERM/SIGHUP handlers; give pytest its own back. Yields the
    handlers found, for a test module that checks them too."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield saved
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def close_figures() -> Iterator[None]:
    """Close every matplotlib figure a test left open (for the modules that draw)."""
    yield
    plt = sys.modules.get("matplotlib.pyplot")  # not imported: no figure to close
    if plt is not None:
        plt.close("all")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The repository's data folder, holding the four verified MNIST IDX files."""
    data = ROOT / "data"
    mnist_files.ensure_mnist(data, verbose=False)
    return data


# ---------------------------------------------------------------------------------------------
# Small synthetic IDX files, named and laid out like MNIST's, with their own (size, md5) table.
# ---------------------------------------------------------------------------------------------
def spec_of(blobs: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    """A `files` table shaped like mnist_files.MNIST_FILES ({name: (size, md5)}) for these bytes."""
    return {name: (len(b), hashlib.md5(b).hexdigest()) for name, b in blobs.items()}


@dataclass
class SmallMnist:
    images: dict[str, np.ndarray]  # "train" / "test" -> uint8 (N, 28, 28)
    labels: dict[str, np.ndarray]  # "train" / "test" -> uint8 (N,)
    blobs: dict[str, bytes]  # file name -> IDX bytes
    files: dict[str, tuple[int, str]]  # file name -> (size, md5)

    def write(self, data_dir: Path, names: list[str] | None = None) -> Path:
        """Write (some of) the files into DATA/MNIST/raw; return that folder."""
        raw = mnist_files.raw_dir(data_dir)
        raw.mkdir(parents=True, exist_ok=True)
        for name in names if names is not None else self.blobs:
            (raw / name).write_bytes(self.blobs[name])
        return raw


def make_small_mnist(n_train: int = 6, n_test: int = 4, seed: int = 0) -> SmallMnist:
    rng = np.random.default_rng(seed)
    images = {"train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)}
    labels = {"train": rng.integers(0, 10, n_train).astype(np.uint8),
              "test": rng.integers(0, 10, n_test).astype(np.uint8)}
    blobs = {
        "train-images-idx3-ubyte": mnist_files.encode_idx(images["train"]),
        "train-labels-idx1-ubyte": mnist_files.encode_idx(labels["train"]),
        "t10k-images-idx3-ubyte": mnist_files.encode_idx(images["test"]),
        "t10k-labels-idx1-ubyte": mnist_files.encode_idx(labels["test"]),
    }
    assert set(blobs) == set(mnist_files.MNIST_FILES)
    return SmallMnist(images, labels, blobs, spec_of(blobs))


@pytest.fixture
def small_mnist() -> SmallMnist:
    return make_small_mnist()


# ---------------------------------------------------------------------------------------------
# Pickles in the format of the classic mnist.pkl.gz (Python 2 cPickle, protocol 2).
# ---------------------------------------------------------------------------------------------
def py2_pickle(obj: object) -> bytes:
    """Pickle numpy arrays as Python 2's cPickle did for mnist.pkl.gz.

    Today's numpy names numpy._core.multiarray._reconstruct and Python 3 writes the array data
    as bytes (BINBYTES); the 2010-era file names numpy.core.multiarray._reconstruct and holds
    the data as Python 2 str (BINSTRING), read back with encoding="latin1". Pickle with
    protocol 3 (text GLOBAL opcodes) and rewrite those opcodes into protocol 2.
    """
    data = pickle.dumps(obj, protocol=3)
    ops = list(pickletools.genops(data))
    out = bytearray()
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(data)
        chunk = data[pos:end]
        if op.name == "PROTO":
            chunk = b"\x80\x02"
        elif op.name == "GLOBAL":
            module, name = arg.split(" ")
            if module == "numpy._core.multiarray":
                module = "numpy.core.multiarray"
            chunk = b"c" + f"{module}\n{name}\n".encode()
        elif op.name == "SHORT_BINBYTES":  # same 1-byte length layout as SHORT_BINSTRING
            chunk = b"U" + chunk[1:]
        elif op.name == "BINBYTES":  # same 4-byte length layout as BINSTRING
            chunk = b"T" + chunk[1:]
        out += chunk
    return bytes(out)


@pytest.fixture
def to_py2_pickle():
    return py2_pickle


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def evil_object(kind: str, marker: Path) -> object:
    """An object whose unpickling creates `marker`: via os.system ("system") or eval ("eval")."""
    if kind == "system":
        return _System(f"touch {shlex.quote(str(marker))}")
    if kind == "eval":
        return _Eval(f"open({str(marker)!r}, 'w').close()")
    raise ValueError(kind)


@pytest.fixture
def evil():
    """evil(kind, marker): an object that creates `marker` when it is unpickled."""
    return evil_object
