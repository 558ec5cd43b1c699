"""What the training loop keeps out of the learner's way: progress bars, running sums kept on
the device, the divergence check, and the history with its one line per epoch.

utils.train and utils.test show the lines of a training step and of an evaluation in full;
everything they count goes through a `Tally`. The history is a list of rows in memory, one dict
per epoch, and columns in a file.
"""

from __future__ import annotations

import math
import sys
from typing import IO, Any

import torch
from torch import nn
from tqdm import tqdm

# False: no bars; True: on stderr (a terminal's convention: stdout stays the log); STDOUT: on
# stdout as it is when the bar starts (a notebook's: Jupyter shows stderr as pink blocks); or
# any other stream.
STDOUT = "stdout"
Progress = bool | IO[str] | str


class NonFiniteLoss(RuntimeError):
    """Training diverged; `batch` is None when it showed only after the epoch's last step."""

    def __init__(self, epoch: int, batch: int | None) -> None:
        where = f"batch {batch}" if batch is not None else "its last batch (test loss)"
        super().__init__(f"loss became NaN or infinite at epoch {epoch}, {where}")
        self.epoch, self.batch = epoch, batch


def progress_bar(loader: Any, desc: str, progress: Progress) -> tqdm:
    """A bar that clears itself when its pass ends (or is interrupted), so a terminal or a saved
    notebook keeps only the epoch lines."""
    stream = (sys.stdout if progress == STDOUT else None if isinstance(progress, bool)
              else progress)
    return tqdm(loader, desc=desc, leave=False, disable=not progress, file=stream,
                mininterval=1.0)


class Tally:
    """Loss and correct predictions summed on the device, read every `refresh_every` batches
    (and at the end), so a GPU is not stalled by a sync per step. With `epoch`, a training
    pass: a non-finite loss is spotted at the next read and reported with the batch where it
    first appeared, and the bar shows the running figures."""

    def __init__(self, device: torch.device, bar: tqdm, epoch: int | None = None,
                 refresh_every: int = 25) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.seen = self.batches = 0
        self.bar, self.epoch, self.refresh_every = bar, epoch, refresh_every
        self.total = len(bar)  # batches in the pass

    @torch.no_grad()
    def add(self, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor,
            summed: bool = False) -> None:
        """One batch: its loss (the batch mean, or with `summed` the sum) and its outputs."""
        self.batches += 1
        loss = loss.detach()
        if self.epoch is not None:
            # the batch number goes in as a Python scalar: no host-to-device copy
            bad = (self.first_bad < 0) & ~torch.isfinite(loss)
            self.first_bad = torch.where(bad, self.batches, self.first_bad)
        self.loss_sum += loss if summed else loss * len(target)
        self.correct += (output.argmax(1) == target).sum()
        self.seen += len(target)
        if self.epoch is not None and (self.batches % self.refresh_every == 0
                                       or self.batches == self.total):
            self._check()
            self.bar.set_postfix(loss=f"{self.loss_sum.item() / self.seen:.4f}",
                                 acc=f"{100 * self.correct.item() / self.seen:.2f}%")

    def _check(self) -> None:
        if self.epoch is not None and self.first_bad.item() >= 0:
            raise NonFiniteLoss(self.epoch, int(self.first_bad.item()))

    def result(self) -> tuple[float, float]:
        """(mean loss, accuracy %) of what was added; ValueError for a pass that saw no
        batch (a mean of nothing is not a number)."""
        self._check()
        if self.seen == 0:
            raise ValueError("the loader is empty: it gave no batch, so there is no loss or "
                             "accuracy to report")
        return self.loss_sum.item() / self.seen, 100.0 * self.correct.item() / self.seen


HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
Row = dict[str, float]


def new_history() -> dict[str, list[float]]:
    """One list per column, one value per finished epoch: a checkpoint's and a metrics file's
    form of the history (in memory it is a list of rows, one dict per epoch)."""
    return {k: [] for k in HISTORY_KEYS}


def history_columns(rows: list[Row]) -> dict[str, list[float]]:
    """A list of epoch rows as the columns a file holds."""
    return {k: [row[k] for row in rows] for k in HISTORY_KEYS}


def history_rows(columns: dict[str, list[float]]) -> list[Row]:
    """A file's columns as one dict per epoch, in HISTORY_KEYS' order."""
    return [dict(zip(HISTORY_KEYS, values, strict=True))
            for values in zip(*(columns[k] for k in HISTORY_KEYS), strict=True)]


def check_epoch_row(row: Any, epoch: int) -> None:
    """A history row as the training loop appends it: every column, finite numbers, the epoch
    after the last; ValueError says what is missing."""
    if not isinstance(row, dict) or set(row) != set(HISTORY_KEYS):
        given = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"each history row needs exactly the keys {', '.join(HISTORY_KEYS)} "
                         f"(epoch {epoch} has {given})")
    if row["epoch"] != epoch:
        raise ValueError(f"history row {epoch} says epoch {row['epoch']}: append one row per "
                         f"epoch, in order")
    for key in HISTORY_KEYS:
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"history epoch {epoch}: {key} is {value!r}, not a number")
        low, high = HISTORY_LIMITS.get(key, (0, math.inf))
        if math.isfinite(value) and not low <= value <= high:  # NaN is check_finite's
            raise ValueError(f"history epoch {epoch}: {key} is {value!r}, outside "
                             f"{low} to {high:g}")


# What a history column can hold: accuracies are percentages; no column can be negative.
HISTORY_LIMITS = {"train_acc": (0, 100), "test_acc": (0, 100)}


def check_finite(model: nn.Module, row: Row) -> None:
    """NonFiniteLoss when the epoch's test loss or the model's weights are no longer finite,
    so that a diverged last step is never saved."""
    if not math.isfinite(row["test_loss"]) or not all_finite(model):
        raise NonFiniteLoss(int(row["epoch"]), None)


def epoch_line(row: Row) -> str:
    """The line each finished epoch prints (it stays when the bars clear)."""
    return (f"epoch {row['epoch']:>2}: train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.2f}% | test loss {row['test_loss']:.4f} acc "
            f"{row['test_acc']:.2f}% | lr {row['lr']:g} | {row['seconds']:.1f}s")


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def final_line(history: list[Row], kept: str = "") -> str:
    """The last line of a run: the final test accuracy first (tests and the README read it),
    then the best epoch, and where the run is kept when `kept` says."""
    best = max(history, key=lambda row: row["test_acc"])  # the first epoch of the best
    line = (f"final test accuracy: {history[-1]['test_acc']:.2f}% after "
            f"{len(history)} epoch{'' if len(history) == 1 else 's'} "
            f"(best {best['test_acc']:.2f}% at epoch {best['epoch']})")
    return f"{line}; {kept}" if kept else line
