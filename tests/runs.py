"""What the tests need of a run beyond train.py's build_run, fit and save_run: the dict a save
writes, a run restored from such a dict through utils.load_checkpoint, and a history's columns;
for the named recipes' tests, a short run's settings, a run stopped after its first epoch, and
train.py run as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import train as cli
from support import checkpoints
from support.bookkeeping import history_columns

ROOT = Path(__file__).resolve().parent.parent
# A few batches of real MNIST: never a full epoch.
TINY = {"limit_train": 256, "limit_test": 200, "batch_size": 64, "test_batch_size": 200}
# Every training here is a few batches; none writes to the repository's checkpoints/.
TINY_ARGS = ["--device", "cpu", "--quiet", "--limit-train", "256", "--limit-test", "200",
        "--batch-size", "64", "--test-batch-size", "200"]

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


class Uncompiled(torch.nn.Module):
    """What torch.compile returns, in shape (the model under `_orig_mod`), without compiling:
    for the tests that are about something else than the compile."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


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
