"""train.py's command line under hostile values, drawn by Hypothesis.

Each drawn command line runs in this process (train.main) in a fresh folder that holds files
of every kind an output could wrongly land on. Every run must end with exit code 0, 1 or 2
(argparse's SystemExit(2) counts as 2) and no traceback, and no file that was there before
may change, except the ones the policy lets change: with --force any output's file, the
checkpoint a --resume continues, and an earlier metrics file of train.py at --metrics. The
MNIST files never change. Trainings are a batch or two: every line starts with tiny sizes,
which a drawn flag may override only with another tiny value.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from runs import SMALL as SAFE  # the tiny sizes every drawn command line starts with
from runs import Uncompiled

import train as cli
import utils
from support import mnist_files

EXAMPLES = 250  # docs/resume.md says how many command lines this tries
SAFE_RECIPE = {**utils.RECIPE, "epochs": 1, "limit_train": 64, "limit_test": 64,
               "batch_size": 64, "test_batch_size": 64}
DATA_FILE = "data/MNIST/raw/t10k-labels-idx1-ubyte"

BAD_INTS = ["0", "-1", "", "1.5", "x", "nan", str(2**31), str(10**30), "-" + "9" * 40]
BAD_FLOATS = ["0", "-1", "", "nan", "inf", "-inf", "1e400", "x"]
PATHS = ["", "-x", "--quiet", "x" * 300, "run.pt", DATA_FILE, "data", "folder", "folder/",
         "notes.txt", "other.json", "m.json", "link.json", "new.pt", "out/new.json",
         "notes.txt/sub.pt", "missing/../run.pt"]
DATA_DIRS = ["data", "", "-x", "x" * 300, "notes.txt", "folder", "run.pt", DATA_FILE, "new"]
CHOICES = {"--device": ["cpu", "tpu", ""], "--loader": ["fast", "torchvision", "gpu"],
           "--dropout-plan": ["table", "none", "every", "x"],
           "--transitions": ["bn-relu", "bare", "x"], "--head": ["conv", "gap", "x"],
           "--augmentation": ["both", "none", "x"]}
# Valid values that keep a training to a batch or two (a drawn flag overrides SAFE's).
SMALL_INTS = {"--epochs": ["1", "2"], "--batch-size": ["16", "64"],
              "--test-batch-size": ["1", "64"], "--limit-train": ["1", "64"],
              "--limit-test": ["1", "64"], "--step-size": ["1", "3"], "--threads": ["1"]}
FLOATS = {"--lr": ["0.01", "1e12"], "--momentum": ["0", "0.9"], "--gamma": ["0.5"],
          "--width": ["0.5", "1"]}
SWITCHES = ["--batch-norm", "--no-batch-norm", "--compile", "--no-compile", "--deterministic",
            "--refetch", "--dry-run", "--no-save", "--force", "--quiet"]


def flag_with(name: str, good: list[str], bad: list[str]) -> st.SearchStrategy[list[str]]:
    """`--flag value` or `--flag=value` (the only way to give a value that starts with -),
    the value as often good as bad, so that a line gets past argparse to the later checks."""
    value = st.one_of(st.sampled_from(good), st.sampled_from(bad))
    return value.flatmap(lambda v: st.sampled_from([[name, v], [f"{name}={v}"]]))


def value_flag() -> st.SearchStrategy[list[str]]:
    options = [flag_with(n, SMALL_INTS[n], BAD_INTS) for n in SMALL_INTS]
    options += [flag_with(n, FLOATS[n], BAD_FLOATS) for n in FLOATS]
    options += [flag_with(n, values[:-1], values[-1:]) for n, values in CHOICES.items()]
    options += [flag_with("--seed", ["0", str(2**64 - 1)], [str(2**64), "", "x"])]
    return st.one_of(options)


def path_flag() -> st.SearchStrategy[list[str]]:
    """Paths are drawn from one small pool, so two flags often name one file."""
    options = [flag_with(n, PATHS, PATHS) for n in ("--save-model", "--resume", "--evaluate",
                                                    "--metrics")]
    return st.one_of([*options, flag_with("--data-dir", DATA_DIRS, DATA_DIRS)])


command_lines = st.tuples(
    st.lists(path_flag(), max_size=3), st.lists(value_flag(), max_size=2),
    st.lists(st.sampled_from(SWITCHES).map(lambda s: [s]), max_size=2),
).flatmap(lambda parts: st.permutations(sum(parts, []))).map(lambda items: sum(items, []))


@pytest.fixture(scope="module")
def data_copy(mnist_dir, tmp_path_factory) -> Path:
    """A copy of MNIST: a wrong write may damage it, never the repository's."""
    copy = tmp_path_factory.mktemp("data")
    raw = mnist_files.raw_dir(copy)
    raw.mkdir(parents=True)
    for name in mnist_files.MNIST_FILES:
        shutil.copyfile(mnist_files.raw_dir(mnist_dir) / name, raw / name)
    return copy


@pytest.fixture(scope="module")
def checkpoint_bytes(data_copy, tmp_path_factory) -> bytes:
    run = cli.build_run(SAFE_RECIPE, torch.device("cpu"), data_copy)
    cli.fit(run, progress=False, log=False)
    path = tmp_path_factory.mktemp("ck") / "run.pt"
    cli.save_run(run, path)
    return path.read_bytes()


def lay_out(folder: Path, data: Path, checkpoint: bytes) -> None:
    """A checkpoint, a metrics file of train.py, a JSON and a text file of someone else's, a
    folder, a link to the checkpoint, and the data."""
    (folder / "run.pt").write_bytes(checkpoint)
    (folder / "m.json").write_text(json.dumps({"recipe": {}, "history": {},
                                               "final_test_acc": 0.0}))
    (folder / "other.json").write_text('{"mine": true}\n')
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "folder").mkdir()
    (folder / "folder" / "keep.txt").write_text("keep\n")
    (folder / "link.json").symlink_to("run.pt")
    (folder / "data").symlink_to(data, target_is_directory=True)


def fingerprints(folder: Path) -> dict[Path, object]:
    """Each file's hash (the data files, large, by inode, size and time: any write or
    replacement changes one of them)."""
    found: dict[Path, object] = {}
    for root, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(root, name)
            if path.is_symlink():
                continue
            st_ = path.stat()
            found[path.resolve()] = ((st_.st_ino, st_.st_size, st_.st_mtime_ns)
                                     if st_.st_size > 1 << 20 else
                                     hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def may_change(argv: list[str], folder: Path) -> set[Path]:
    """What the policy lets this command line change (nothing, if it does not parse)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = cli.build_parser().parse_args(argv)
    except SystemExit:
        return set()
    allowed: set[Path] = set()
    outputs = [p for p in (args.save_model, args.metrics) if p]
    if args.force:
        allowed |= {(folder / p).resolve() for p in outputs}
    resumed = args.resume and not (args.no_save or args.dry_run) and (
        args.save_model is None or (folder / args.save_model).resolve()
        == (folder / args.resume).resolve())
    if resumed:  # a resume saves to its own checkpoint
        allowed.add((folder / args.resume).resolve())
    if args.metrics and (folder / args.metrics).resolve() == (folder / "m.json").resolve():
        allowed.add((folder / "m.json").resolve())
    data = {(folder / DATA_FILE).parent.resolve() / n for n in mnist_files.MNIST_FILES}
    return allowed - data


def run_in(folder: Path, argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.chdir(cwd)
    return code, out.getvalue() + err.getvalue()


@pytest.fixture
def offline(monkeypatch):
    """No fetch reaches the network, and --compile does not compile (both beside the point)."""
    def offline_source(dest, files):
        raise RuntimeError("offline in this test")

    for name in mnist_files.SOURCES:
        monkeypatch.setitem(mnist_files.SOURCES, name, offline_source)
    monkeypatch.setattr(cli, "compiled", lambda model, device: Uncompiled(model))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(drawn=command_lines)
# Known hostile cases, every time.
@example(drawn=["--no-save", "--metrics", "run.pt"])
@example(drawn=["--save-model", "x.pt", "--metrics", "x.pt"])
@example(drawn=["--resume", "run.pt", "--epochs", "2", "--metrics", "run.pt"])
@example(drawn=["--evaluate", "run.pt", "--metrics", "run.pt"])
@example(drawn=["--evaluate", ""])
@example(drawn=["--resume", ""])
@example(drawn=["--metrics", DATA_FILE, "--force", "--no-save"])
@example(drawn=["--metrics", "x" * 300, "--no-save"])
def test_hostile_command_lines(drawn, data_copy, checkpoint_bytes, offline):
    argv = SAFE + drawn
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp).resolve()
        lay_out(folder, data_copy, checkpoint_bytes)
        before = fingerprints(folder)
        code, text = run_in(folder, argv)
        assert code in (0, 1, 2), (argv, code, text)
        assert "Traceback" not in text, (argv, text)
        after = fingerprints(folder)
        allowed = may_change(argv, folder)
        changed = {p for p, fp in before.items() if after.get(p) != fp} - allowed
        assert not changed, (argv, sorted(map(str, changed)), text)
        left = [p for p in after if p.name.endswith((".partial", ".lock"))]
        assert not left, (argv, left)
