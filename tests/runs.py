"""What the tests need of a run beyond train.py's build_run, fit and save_run: the dict a save
writes, a run restored from such a dict through utils.load_checkpoint, and a history's columns."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import train as cli
from support.bookkeeping import history_columns

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


CPU = torch.device("cpu")
# A few batches of real MNIST: never a full epoch.
TINY = {"limit_train": 256, "limit_test": 200, "batch_size": 64, "test_batch_size": 200}


def without_seconds(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "seconds"}


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
