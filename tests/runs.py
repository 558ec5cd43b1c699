"""What the tests need of a run beyond train.py's build_run, fit and save_run: the dict a save
writes, a run restored from such a dict through utils.load_checkpoint, and a history's columns;
the notebook's cells, each run from its own source with the names its earlier cells define;
train.py run as a user runs it, and a failure raised where it saves; for the named recipes'
tests, a short run's settings, a run stopped after its first epoch, the bit-for-bit comparison."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch

import model
import train as cli
import utils
from support import checkpoints, stopping
from support.bookkeeping import history_columns
from support.mnist_files import ensure_mnist

ROOT = Path(__file__).resolve().parent.parent

cols = history_columns  # run.history is a list of rows; a file's history is these columns


def run_state(run: cli.Run) -> dict:
    """What utils.save_checkpoint writes for the run as it stands, read back raw."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pt"
        cli.save_run(run, str(path))
        return torch.load(path, weights_only=True)


def restore_run(run: cli.Run, checkpoint: dict) -> None:
    """Continue `run` from a checkpoint dict, through utils.load_checkpoint itself; the test
    has set the run's recipe (any key may differ from the saved one)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "restore.pt"
        torch.save(checkpoint, path)
        cli.resume_run(run, str(path), may_change=tuple(run.recipe))


# ---------------------------------------------------------------------------------------------
# The notebook's cells, run as the notebook holds them.
# ---------------------------------------------------------------------------------------------
CPU = torch.device("cpu")
# A few batches of real MNIST: never a full epoch.
TINY = {"limit_train": 256, "limit_test": 200, "batch_size": 64, "test_batch_size": 200}


def without_seconds(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "seconds"}


RECIPE = {**utils.RECIPE, **TINY, "epochs": 3}
NOTEBOOK = Path(__file__).resolve().parent.parent / "Session_6_Solution.ipynb"
CELLS = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


def cell(marker: str) -> str:
    """The one code cell of the notebook that contains `marker`."""
    (source,) = [source for source in CELLS if marker in source]
    return source


SETTINGS_CELL, PLOTS_CELL = cell("CHECKPOINT = "), cell("finished = ")


def the_notebooks_names() -> dict:
    """What the settings cell imports from model and utils, as they are now (so that a test's
    monkeypatch reaches the cells), and torch and time."""
    names = re.search(r"from utils import \((.*?)\)", SETTINGS_CELL, re.S).group(1)
    return {**{n.strip(): getattr(utils, n.strip()) for n in names.split(",") if n.strip()},
            **{n: getattr(model, n) for n in ("Net", "layer_table")}, "torch": torch,
            "time": time}


def settings_cell(monkeypatch, smoke: str | None) -> dict:
    """Run the settings cell with S6_SMOKE set to `smoke` (None: unset); return its names."""
    if smoke is None:
        monkeypatch.delenv("S6_SMOKE", raising=False)
    else:
        monkeypatch.setenv("S6_SMOKE", smoke)
    names: dict = {}
    exec(SETTINGS_CELL, names)
    return names


def plots_cell(tmp_path: Path, done: int, epochs: int, images: str | None) -> str:
    """Run the plots cell after `done` of `epochs` epochs; return what it printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = dict(train_loss=0.1, train_acc=98.0, test_loss=0.05, test_acc=99.0, lr=0.01,
               seconds=1.0)
    history = [{"epoch": e, **row} for e in range(1, done + 1)]
    folder = None if images is None else str(tmp_path / images)
    out = io.StringIO()
    names = {**the_notebooks_names(), "history": history, "recipe": {"epochs": epochs},
             "IMAGES": folder, "samples_fig": plt.figure(), "print": lambda *a, **k: print(
                 *a, **k, file=out)}
    exec(PLOTS_CELL, names)
    plt.close("all")
    return out.getvalue()


TRAINING_CELL = cell("for epoch in")


def training_cell(recipe: dict, path: Path, data_dir: Path, retrain: bool = False,
                  edit: tuple[str, str] | None = None) -> SimpleNamespace:
    """Run the notebook's training cell (with `edit`: one string of it replaced, as a learner
    would edit it); return its names: model, optimizer, scheduler, history..."""
    ensure_mnist(data_dir, verbose=False)  # the Data cell, run before it, fetched MNIST
    source = TRAINING_CELL if edit is None else TRAINING_CELL.replace(*edit)
    assert edit is None or source != TRAINING_CELL, "the edit changes nothing"
    names = {**the_notebooks_names(), "recipe": recipe, "device": CPU,
             "DATA": str(data_dir), "CHECKPOINT": path, "RETRAIN": retrain}
    exec(source, names)
    return SimpleNamespace(**names)


def shown(text: str) -> str:
    """The text as a terminal or Jupyter shows it: each line from its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def epochs_logged(text: str) -> list[int]:
    return [int(e) for e in re.findall(r"^epoch +(\d+): train loss", shown(text), re.M)]


COLAB_CELL = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
                  if c.cell_type == "code" and "REPO = " in c.source)
PLACEHOLDER = re.search(r'^REPO = "([^"]+)"', COLAB_CELL, re.M).group(1)


def run_colab_cell(tmp_path: Path, repo: str, git: str, times: int = 1
                   ) -> subprocess.CompletedProcess:
    """Run the cell `times` times in one process, where the repository's files are not (a fresh
    folder, as Colab's /content), with REPO set to `repo` and `git` (a shell script) standing in
    for git; between two runs it prints the folder it is in."""
    bin_dir, work = tmp_path / "bin", tmp_path / "content"
    bin_dir.mkdir()
    work.mkdir()
    (bin_dir / "git").write_text(f"#!/bin/sh\n{git}")
    (bin_dir / "git").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    source = COLAB_CELL.replace(f'REPO = "{PLACEHOLDER}"', f'REPO = "{repo}"')
    code = "\nimport os\nprint('cwd', os.getcwd())\n".join([f"exec({source!r})"] * times)
    return subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


class Uncompiled(torch.nn.Module):
    """What torch.compile returns, in shape (the model under `_orig_mod`), without compiling:
    for the tests that are about something else than the compile."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


def saved(tmp_path: Path, state: dict, name: str = "edited.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def negative_running_variance(state: dict) -> None:
    """A checkpoint's BatchNorm variance no model can have (evaluation would be NaN)."""
    state["model"]["features.conv3.1.running_var"].fill_(-1.0)


# Every training here is a few batches; none writes to the repository's checkpoints/.
TINY_ARGS = ["--device", "cpu", "--quiet", "--limit-train", "256", "--limit-test", "200",
        "--batch-size", "64", "--test-batch-size", "200"]


def recipe_of(flags: list[str]) -> dict:
    """The recipe train.py runs for these flags."""
    return cli.recipe_from(cli.build_parser().parse_args(flags))


def stopped_after_epoch_1(run: cli.Run, path: Path) -> dict:
    """Fit `run`, save it after its first epoch and cut it short there; the checkpoint read
    back (checked)."""

    class Stop(Exception):
        pass

    def save_then_stop(_history: dict) -> None:
        cli.save_run(run, path)
        raise Stop

    try:
        cli.fit(run, on_epoch_end=save_then_stop, progress=False, log=False)
    except Stop:
        return checkpoints.read_checkpoint(path)
    raise AssertionError("the run ended before its first epoch did")


def assert_same_run(resumed: cli.Run, unbroken: cli.Run) -> None:
    """Every history column but the seconds, and every weight, bit for bit."""
    for column, values in cols(unbroken.history).items():
        if column != "seconds":
            assert cols(resumed.history)[column] == values, column
    for key, value in unbroken.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_no_traceback(done: subprocess.CompletedProcess | str) -> None:
    text = done if isinstance(done, str) else done.stdout + done.stderr
    assert "Traceback" not in text, text


def after_save(monkeypatch: pytest.MonkeyPatch, epoch: int, error: BaseException) -> None:
    """train.py saves through stopping.written: raise `error` once epoch `epoch` is saved;
    an OSError instead fails the save of the next epoch, as a full disk does."""
    real = stopping.written

    def full_disk() -> None:
        raise error

    def written(what: str, write: Callable[[], object]) -> None:
        if isinstance(error, OSError) and what.startswith(f"save epoch {epoch + 1} "):
            write = full_disk
        real(what, write)
        if not isinstance(error, OSError) and what.startswith(f"save epoch {epoch} "):
            raise error

    monkeypatch.setattr(stopping, "written", written)


# The recipe TINY_ARGS's flags give (with --epochs 1), so a checkpoint of it resumes with TINY_ARGS.
TINY_RECIPE = {**utils.RECIPE, "epochs": 1, "limit_train": 256, "limit_test": 200,
               "batch_size": 64, "test_batch_size": 200}
# In-process runs: a few batches, never the repository's checkpoints/ or data/ for writing.
SMALL = ["--device", "cpu", "--quiet", "--limit-train", "64", "--limit-test", "64",
         "--batch-size", "64", "--test-batch-size", "64", "--epochs", "1"]


def spawn(args: list[str], tmp: Path, **kwargs) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env(), stdout=open(out, "w"),
        stderr=open(err, "w"), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kwargs)
    return proc, out, err


def wait_for(path: Path, proc: subprocess.Popen, err: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"train.py exited early: {err.read_text()}"
        assert time.monotonic() < deadline, f"no {path} within {seconds} s"
        time.sleep(0.1)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main(capsys, *args: str) -> tuple[int, str, str]:
    """train.main as a shell runs it: the exit code (argparse's SystemExit included)."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, out, err


def refused(capsys, *args: str) -> str:
    """A policy refusal: exit 2 and one line, `train.py: error: ...`, without a usage block."""
    code, out, err = main(capsys, *args)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert "final test accuracy" not in out
    return lines[0]


def total_parameters(net: torch.nn.Module) -> int:
    """The course graders' count, every parameter (test_course_checks.py keeps their file's own
    copy, as they run it)."""
    return sum(p.numel() for p in net.parameters())
