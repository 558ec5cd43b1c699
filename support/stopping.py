"""How a train.py run ends before its end, and what it says then: its error boundary.

    Ctrl-C, SIGTERM, SIGHUP     interrupted (...) while ...; then what is on disk   128 + signal
    a refused flag or path      train.py: error: ...  (command_line.refuse)                   2
    stdout's reader gone        stopped: the output was closed; ...                  141
    a failure a user can meet   error: ...  (failure_message)                        1
    anything else: a bug        its traceback                                        1

Each says which epoch is on disk, and `Status` says so only after read_checkpoint found that
epoch in the file itself, with a command that pastes as it is. The failures a user can cause
or meet are recognised in the forms torch raises them, through an exception's whole chain
(its cause and context, and the exception an InductorError wraps), because torch often
reports one failure as another: a full disk during torch.save as RuntimeError "unexpected
pos", with the OSError as context.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from support import checkpoints, locks, mnist_files
from support.bookkeeping import NonFiniteLoss
from support.command_line import (
    UsageError,
    checkpoint_command,
    flag,
    given,
    new_run_command,
    refuse,
    unused_path,
)
from support.recipe import DEFAULTS, ONECYCLES


def guarded(command: Callable[[], int], status: Status, then_exit: bool = False) -> int:
    """`command`'s exit code, or the one line and exit code of what stopped it; `status` says
    what it was doing. Signals stop it cleanly (stopping_on_signals); `then_exit` when the
    process ends after it."""
    line_buffered()
    with stopping_on_signals(then_exit):
        try:
            return command()
        except KeyboardInterrupt as err:
            return report_interrupt(err, status)
        except UsageError as err:
            refuse(str(err))
        except BrokenPipeError:
            return stop_quietly(status)
        except Exception as err:
            message = failure_message(err, status)
            if message is None:
                raise  # a bug: its traceback is what a fix needs
            return error(message)


def error(message: str) -> int:
    """A failure a user can cause or meet, on stderr: one line, exit code 1."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def line_buffered() -> None:
    """Each line reaches a pipe or a file when it is printed (`| tee log`, `> log` followed
    with tail -f): Python buffers a redirected stdout in 8 KB blocks otherwise."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


# ---------------------------------------------------------------------------------------------
# What is on disk: every message about a saved epoch is checked against the file itself.
# ---------------------------------------------------------------------------------------------
@dataclass
class Status:
    """What the run is doing, and which checkpoint epochs it may have completed on disk."""

    doing: str = "starting"
    data_dir: str | None = None  # given with --data-dir, so a resume command repeats it
    evaluating: bool = False
    metrics: str | None = None  # the --metrics file being written, after the last epoch
    recipe: dict = field(default_factory=dict)
    test: Callable | None = None  # utils.test: a failure inside it happened while testing
    # path -> the epoch counts that file may hold from this run (a save may be cut short)
    candidates: dict[str, set[int]] = field(default_factory=dict)

    def expect(self, path: str | None, epochs: int) -> None:
        if path and epochs:
            self.candidates.setdefault(path, set()).add(epochs)

    def saved(self) -> tuple[str, int] | None:
        """The newest complete checkpoint of this run: (path, epochs), or None."""
        best = None
        for path, epochs in self.candidates.items():
            try:
                n = len(checkpoints.read_checkpoint(path)["history"]["epoch"])
            except checkpoints.CheckpointError:
                continue
            if n in epochs and (best is None or n > best[1]):
                best = (path, n)
        return best

    def command(self, path: str, *more: str) -> str:
        return checkpoint_command("--resume", path, self.data_dir, *more)

    def nothing(self) -> str:
        if self.evaluating:
            return "an evaluation writes nothing."
        return "no complete epoch was saved."

    def report(self, no_epoch: str | None = None, one_line: bool = False) -> str:
        """What is on disk, with the command that continues it on a line of its own, or in
        backticks when the message must stay one line."""
        found = self.saved()
        if found is None:
            return no_epoch or self.nothing()
        path, n = found
        if self.metrics:  # the run is finished: what remains is its metrics
            saved = f"epoch {n} is saved in {path}; write its metrics with"
            command = self.command(path, *given("--metrics", self.metrics))
        else:
            saved, command = f"epoch {n} is saved in {path}; continue with", self.command(path)
        return f"{saved} `{command}`" if one_line else f"{saved}:\n  {command}"

    def summary(self, no_epoch: str | None = None) -> str:
        """`report` on one line."""
        return self.report(no_epoch, one_line=True)


# ---------------------------------------------------------------------------------------------
# Signals.
# ---------------------------------------------------------------------------------------------
class Stopped(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, all handled as Ctrl-C: the same clean stop and report."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


@contextmanager
def stopping_on_signals(then_exit: bool = False) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP raise Stopped, each unless it was ignored when the run
    started (nohup ignores SIGHUP; a background job, SIGINT). The handlers found are restored
    at the end, for a caller that goes on (a test); a process that exits after (`then_exit`)
    ignores the signals instead, since the default action of a second Ctrl-C or SIGTERM during
    the interpreter's shutdown would replace the exit code, or add a traceback."""
    found = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in found.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _stop)
    try:
        yield
    finally:
        if then_exit:
            ignore_stop_signals()
        else:
            for s, handler in found.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _stop(signum: int, frame: object) -> None:
    ignore_stop_signals()  # a second signal would cut the clean-up and the report short
    raise Stopped(signum)


def ignore_stop_signals() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def report_interrupt(err: KeyboardInterrupt, status: Status) -> int:
    """Say what stopped the run and which epoch is on disk; further signals are ignored
    meanwhile (stopping_on_signals sets the handlers after)."""
    ignore_stop_signals()
    signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    print(f"\ninterrupted ({name}) while {status.doing}.", file=sys.stderr)
    print(status.report(), file=sys.stderr)
    return 128 + signum


# ---------------------------------------------------------------------------------------------
# Failures: one line each.
# ---------------------------------------------------------------------------------------------
def failure_message(err: Exception, status: Status) -> str | None:
    """The one line for a failure a user can cause or meet, or None for anything else."""
    if isinstance(err, (checkpoints.CheckpointError, checkpoints.CheckpointInUse, locks.Unusable,
                        mnist_files.DataFileError, mnist_files.MnistUnavailable)):
        return str(err)
    if isinstance(err, WriteFailed):
        return f"{err}; {status.summary()}"
    if out_of_memory(err):
        return _out_of_memory(err, status)
    reason = missing_compiler(err)
    if reason is not None:
        return _no_compiler(reason, status)
    return None


def _no_compiler(reason: str, status: Status) -> str:
    """The run can go on without torch.compile: from its checkpoint, with --no-compile."""
    found = status.saved()
    if found is None:
        return (f"--compile found no C++ compiler ({reason}): run again without --compile, or "
                f"install a C++ compiler (g++ or clang++); {status.nothing()}")
    path, n = found
    return (f"--compile found no C++ compiler ({reason}); epoch {n} is saved in {path}: "
            f"continue without compiling with `{status.command(path, '--no-compile')}`")


def _out_of_memory(err: Exception, status: Status) -> str:
    """Which batch ran out of memory, and the flag that makes it smaller."""
    testing = while_testing(err, status.test)
    key = "test_batch_size" if status.evaluating or testing else "batch_size"
    name = flag(key)
    # fit tests each epoch after training it, under the same "training epoch N"
    doing = status.doing.replace("training", "testing", 1) if testing else status.doing
    what = f"out of memory while {doing} with {name} {status.recipe.get(key, DEFAULTS[key]):,}"
    found = status.saved()
    if found is None:
        return f"{what}: run again with a smaller {name}; {status.nothing()}"
    return (f"{what}: start a new run with a smaller {name} and --save-model NEW.pt (a resume "
            f"keeps the saved {name}); epoch {found[1]} is saved in {found[0]}")


def stop_quietly(status: Status) -> int:
    """stdout's reader has gone (`train.py | head -1`): stop, keeping what is saved, with one
    line on stderr; exit as a process that SIGPIPE ended, as a pipeline expects."""
    try:  # Python flushes stdout at exit: into the closed pipe, that would be one more error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    print(f"stopped: the output was closed; {status.summary()}", file=sys.stderr)
    return 128 + getattr(signal, "SIGPIPE", 13)


def report_divergence(err: NonFiniteLoss, lr: float, status: Status) -> str:
    """The line for a loss that became NaN: a checkpoint is named only after read_checkpoint
    found it whole and finite."""
    found = status.saved()
    if status.recipe.get("schedule") in ONECYCLES:
        return f"{err}; stopped. {_onecycle_divergence(found, status)}"
    if found is None:
        advice = f"no good epoch was saved; start again with a smaller --lr (say {lr / 10:g})"
    else:
        path, n = found
        command = status.command(path, "--lr", f"{lr / 10:g}")
        advice = (f"the last good checkpoint (epoch {n}) is {path}; continue it with a smaller "
                  f"learning rate: {command}")
    return f"{err}; stopped. {advice}"


def _onecycle_divergence(found: tuple[str, int] | None, status: Status) -> str:
    """A OneCycle run keeps its peak on resume (docs/resume.md): the way on is a new run with a
    smaller peak, into a file of its own so that the saved epochs stay."""
    peak = status.recipe["lr"] / 10
    if found is None:
        return f"no good epoch was saved; start again with a smaller peak --lr (say {peak:g})"
    path, n = found
    command = new_run_command(status.recipe, status.data_dir, unused_path(path, f"lr{peak:g}"),
                              lr=peak)
    return (f"the last good checkpoint (epoch {n}) is {path}; a OneCycle run keeps its peak lr "
            f"on resume, so train a new one with a smaller peak: `{command}`")


# ---------------------------------------------------------------------------------------------
# Which failures a user can cause or meet.
# ---------------------------------------------------------------------------------------------
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")
# What torch's zip writer says when a write to the file it was given failed.
FAILED_WRITE = ("unexpected pos", "file write failed")


def chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what it was raised from or during, each once."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "inner_exception", None))
                 if isinstance(x, BaseException)]


def write_failure(err: BaseException) -> str | None:
    """Why a write failed (disk full, no permission, ...), or None if `err` is not about a
    write: the OSError's words, else torch's writer's."""
    for e in chain(err):
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            return e.strerror or str(e)
    for e in chain(err):
        if isinstance(e, RuntimeError) and any(w in str(e) for w in FAILED_WRITE):
            return "the write failed (is the disk full?)"
    return None


def out_of_memory(err: BaseException) -> bool:
    """The device or the CPU ran out of memory: torch.OutOfMemoryError on CUDA and MPS,
    RuntimeError "DefaultCPUAllocator: can't allocate memory" on the CPU, or MemoryError."""
    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    return any(isinstance(e, (MemoryError, oom)) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in OUT_OF_MEMORY))
        for e in chain(err))


def while_testing(err: BaseException, test: Callable | None) -> bool:
    """`err` was raised inside `test` (utils.test, which train.py names: the test batches),
    not in a training step. Frames are matched by their code, not by a file's name."""
    if test is None:
        return False
    code = inspect.unwrap(test).__code__  # torch.inference_mode wraps it
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def missing_compiler(err: BaseException) -> str | None:
    """torch.compile's words when it found no working C++ compiler (Inductor's
    InvalidCxxCompiler, which most releases wrap in an InductorError), else None."""
    for e in chain(err):
        if type(e).__name__ == "InvalidCxxCompiler" or str(e).startswith("InvalidCxxCompiler"):
            return str(e).splitlines()[0].removeprefix("InvalidCxxCompiler: ")
    return None


class WriteFailed(RuntimeError):
    """A checkpoint or --metrics write failed for a reason the user can fix (disk full...)."""


def written(what: str, write: Callable[[], object]) -> None:
    """Run `write`; a failure that `write_failure` explains becomes WriteFailed("could not
    {what}: {reason}"), anything else (a bug) goes on as it is."""
    try:
        write()
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise WriteFailed(f"could not {what}: {reason}") from err
