"""What the tests need of a run beyond train.py's build_run, fit and save_run: the dict a save
writes, a run restored from such a dict through utils.load_checkpoint, a history's columns;
train.py run as a user runs it, and a failure raised where it saves."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import train as cli
from support import stopping
from support.bookkeeping import history_columns

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


class Uncompiled(torch.nn.Module):
    """What torch.compile returns, in shape (the model under `_orig_mod`), without compiling:
    for the tests that are about something else than the compile."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


# Every training here is a few batches; none writes to the repository's checkpoints/.
TINY = ["--device", "cpu", "--quiet", "--limit-train", "256", "--limit-test", "200",
        "--batch-size", "64", "--test-batch-size", "200"]


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
