"""DataLoader workers and Ctrl-C: the torchvision loader's workers leave Ctrl-C to the main
process, and start with it held, so that stopping a run never prints a worker's traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader


def leave_ctrl_c(worker_id: int) -> None:
    """A DataLoader worker leaves Ctrl-C to the main process, which stops the workers: one that
    took it could die mid-batch, and its ConnectionResetError reach the user as a traceback.
    And a main process stopped by Ctrl-C while it fetched a batch's file descriptor from the
    worker hangs up on the worker's resource-sharer thread, which reports the reset through
    sys.excepthook: in a worker, a lost connection to the main process is not news."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _quiet_about_a_gone_main_process(sys.excepthook)


def _quiet_about_a_gone_main_process(hook: Any) -> Any:
    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            hook(kind, value, tb)
    return excepthook


class CtrlCSafeDataLoader(DataLoader):
    """A DataLoader that starts its workers under ctrl_c_held: a Ctrl-C then cannot kill a
    forked worker before its leave_ctrl_c has run, nor stop the main process with the workers
    half set up (either way torch printed a traceback as the run stopped). A spawned worker
    (macOS's default) starts a fresh interpreter, which no handler of ours reaches."""

    def __iter__(self) -> Any:
        with ctrl_c_held():
            return super().__iter__()


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Ctrl-C waits until the block ends, then arrives as usual: meanwhile SIGINT's handler
    only records it, in this process and in a worker forked meanwhile (until leave_ctrl_c).
    Only the main thread may set a handler: elsewhere, nothing is held."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):  # None: not set from Python
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        signal.raise_signal(signal.SIGINT)  # to the handler found: it raises, or ignores it
