"""How a train.py run stops before its end, and what it says then.

Ctrl-C, SIGTERM and SIGHUP stop a run cleanly (`stopping_on_signals`); a failure a user can
cause or meet (failures.py recognises them) is one line (`failure_message`); a closed stdout
stops it quietly (`stop_quietly`); a diverged loss points to a checkpoint only after checking
it (`report_divergence`). Each says which epoch is on disk, and `Status` says so only after
read_checkpoint found that epoch in the file itself, with a command that pastes as it is.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from support import checkpoints, failures, locks, mnist_files
from support.bookkeeping import NonFiniteLoss
from support.flag_types import flag
from support.recipe import ONECYCLES, RECIPE, full_recipe

PROG = "train.py"


def invocation() -> list[str]:
    """train.py as the user ran it, so that a hint pastes where they ran it: the script's path
    as they typed it, after their interpreter: `python` where that finds this one on PATH (a
    link beside it in the same folder is the same environment), else its path. Called from
    elsewhere (a test, a benchmark), `python train.py`."""
    if Path(sys.argv[0]).name != PROG:
        return ["python", PROG]
    here = os.path.abspath(sys.executable)
    on_path = shutil.which("python")
    same = on_path is not None and os.path.dirname(os.path.abspath(on_path)) == (
        os.path.dirname(here)) and os.path.samefile(on_path, here)
    return ["python" if same else here, sys.argv[0]]


def resume_command(path: str, data_dir: str | None, *more: str) -> str:
    """A command that can be pasted as it is: quoted, and with the run's data folder when it
    is not the default."""
    return checkpoint_command("--resume", path, data_dir, *more)


def checkpoint_command(option: str, path: str, data_dir: str | None, *more: str) -> str:
    """`python train.py OPTION PATH`, with the run's data folder when it is not the default.
    A value that starts with '-' is joined to its flag (`--resume=-run.pt`): on its own,
    argparse would take it for a flag and refuse the pasted command."""

    words = [*invocation(), *_given(option, path)]
    if data_dir is not None:
        words += _given("--data-dir", data_dir)
    return shlex.join([*words, *more])


def new_run_command(recipe: dict, data_dir: str | None, save_model: str, **changes: object
                    ) -> str:
    """`python train.py ...` that trains `recipe` anew, with `changes` (recipe keys), into
    `save_model`: its model's named recipe and the flags of every value that differs from it,
    so that the new run repeats the saved one but for the changes."""
    recipe = {**recipe, **changes}
    named = full_recipe({"model": recipe["model"]})
    words = invocation()
    if recipe["model"] != RECIPE["model"]:
        words += ["--model", recipe["model"]]  # first: it names the recipe the rest changes
    for key, value in recipe.items():
        # OneCycle ignores StepLR's keys, so a flag for them would be refused
        skip = recipe["schedule"] in ONECYCLES and key in ("step_size", "gamma")
        if skip or key == "model" or value == named[key]:
            continue
        if isinstance(value, bool):
            words.append(flag(key) if value else "--no-" + key.replace("_", "-"))
        else:
            words += _given(flag(key), str(value))
    if data_dir is not None:
        words += _given("--data-dir", data_dir)
    return shlex.join([*words, *_given("--save-model", save_model)])


def _given(name: str, value: str) -> list[str]:
    """A flag and its value; joined when the value starts with '-' (see checkpoint_command)."""
    return [f"{name}={value}"] if value.startswith("-") else [name, value]


def unused_path(beside: str, tag: str) -> str:
    """A file name beside `beside` that no file has yet: NAME-TAG.pt, then NAME-TAG-2.pt..."""
    path = Path(beside)
    for n in range(1, 1000):
        name = f"{path.stem}-{tag}{'' if n == 1 else f'-{n}'}{path.suffix or '.pt'}"
        candidate = str(path.with_name(name))
        if not os.path.lexists(candidate):
            return candidate
    return str(path.with_name(f"{path.stem}-{tag}-{os.getpid()}{path.suffix or '.pt'}"))


# ---------------------------------------------------------------------------------------------
# What is on disk: every message about a saved epoch is checked against the file itself.
# ---------------------------------------------------------------------------------------------
@dataclass
class Status:
    """What the run is doing, and which checkpoint epochs it may have completed on disk."""

    doing: str = "starting"
    data_dir: str | None = None  # given with --data-dir, so a resume command repeats it
    evaluating: bool = False
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
        return resume_command(path, self.data_dir, *more)

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
        saved = f"epoch {n} is saved in {path}; continue with"
        if one_line:
            return f"{saved} `{self.command(path)}`"
        return f"{saved}:\n  {self.command(path)}"

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
    if isinstance(err, failures.WriteFailed):
        return f"{err}; {status.summary()}"
    if failures.out_of_memory(err):
        return _out_of_memory(err, status)
    reason = failures.missing_compiler(err)
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
    testing = failures.while_testing(err, status.test)
    key = "test_batch_size" if status.evaluating or testing else "batch_size"
    name = flag(key)
    # fit tests each epoch after training it, under the same "training epoch N"
    doing = status.doing.replace("training", "testing", 1) if testing else status.doing
    what = f"out of memory while {doing} with {name} {status.recipe.get(key, RECIPE[key]):,}"
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
