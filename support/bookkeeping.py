"""What the training loop keeps out of the learner's way: progress bars, running sums kept on
the device, the divergence check, and the history with its one line per epoch.

utils.train and utils.test show the five lines of a training step and the three of an
evaluation; everything they count goes through a `Tally`, and each finished epoch through
`record_epoch`.
"""

from __future__ import annotations

import math
import sys
import time
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


def new_history() -> dict[str, list[float]]:
    """One list per column, one value per finished epoch (a checkpoint holds it as is)."""
    keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
    return {k: [] for k in keys}


def start_epoch(run: Any) -> None:
    """Note the learning rate the next epoch trains at, and start its clock."""
    run.lr = run.optimizer.param_groups[0]["lr"]
    run.clock = time.perf_counter()


def record_epoch(run: Any, train_loss: float, train_acc: float, test_loss: float,
                 test_acc: float, log: bool = True) -> None:
    """Append the finished epoch to run.history and print its line (it stays when the bars
    clear). A run whose test loss or weights are no longer finite raises NonFiniteLoss before
    anything is recorded, so a diverged last step is never saved."""
    epoch = len(run.history["epoch"]) + 1
    if not math.isfinite(test_loss) or not all_finite(run.model):
        raise NonFiniteLoss(epoch, None)
    row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
               test_acc=test_acc, lr=run.lr, seconds=time.perf_counter() - run.clock)
    for key, value in row.items():
        run.history[key].append(value)
    if log:
        tqdm.write(f"epoch {epoch:>2}: train loss {train_loss:.4f} acc {train_acc:.2f}% | "
                   f"test loss {test_loss:.4f} acc {test_acc:.2f}% | lr {run.lr:g} | "
                   f"{row['seconds']:.1f}s")


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def final_line(history: dict[str, list[float]]) -> str:
    """The notebook's last line: the final test accuracy, the best, and the epochs run."""
    acc, n = history["test_acc"], len(history["epoch"])
    return (f"final test accuracy: {acc[-1]:.2f}% (best {max(acc):.2f}%) after {n} "
            f"epoch{'' if n == 1 else 's'}")
