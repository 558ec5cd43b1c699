"""Every command a message suggests, pasted as printed, does what the message says.

One table: each row makes a situation in a folder of its own (a finished run, an interrupted
one, a run that diverged...), provokes one message of train.py there, and lists what each
command in it promises. The test takes every `python train.py ...` the message holds, runs
it as a shell would (in the folder where the first command ran, as a user pastes it), and
checks it against an oracle that reads the command itself: a --resume continues the file to
the epochs it names with the flags it gives, an --evaluate scores the file and changes
nothing, a new run trains the recipe it spells into a new file and leaves the old one alone.
A message never suggests a command that is refused, so every pasted command must exit 0.

A second test reads train.py and support/ and checks that every function which words a
suggested command has a row, so a new message cannot go unpasted. Rows for the notebook's
helpers can join: a row needs only `provoke` (make the situation, return the message) and
`covers` (the functions whose words it checks); a pasted command that is not train.py's
gets its own oracle in `check_pasted`.
"""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from runs import TINY_ARGS, Uncompiled, after_save, assert_no_traceback, env, main, train

import train as cli
from support import checkpoints, command_line, stopping
from support.bookkeeping import NonFiniteLoss

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("signals_restored")
# In-process runs here: a few batches on the CPU (the pasted commands repeat their recipes).
SMALL = ["--device", "cpu", "--quiet", "--limit-train", "128", "--limit-test", "128",
         "--batch-size", "64", "--test-batch-size", "128"]
COMPACT = ["--model", "compact", *SMALL]


# ---------------------------------------------------------------------------------------------
# Situations, made with train.py itself.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_dir) -> dict[str, bytes]:
    """The bytes of two finished runs: a StepLR run of 1 epoch, a OneCycle (compact) of 2."""
    tmp = tmp_path_factory.mktemp("finished")
    found = {}
    for name, flags in (("step", [*TINY_ARGS, "--epochs", "1"]),
                        ("onecycle", ["--model", "compact", *TINY_ARGS, "--epochs", "2"])):
        done = train(*flags, "--save-model", str(tmp / f"{name}.pt"))
        assert done.returncode == 0, done.stderr
        found[name] = (tmp / f"{name}.pt").read_bytes()
    return found


@dataclass
class Here:
    """A folder to provoke a message in (its data/ is the repository's MNIST)."""

    path: Path
    capsys: pytest.CaptureFixture
    monkeypatch: pytest.MonkeyPatch
    finished: dict[str, bytes]

    def file(self, name: str, kind: str, epochs: int | None = None) -> str:
        """A copy of a finished run's checkpoint; with `epochs`, as a run of that many epochs
        that stopped after its first (StepLR only: OneCycle's schedule is fixed by its
        epochs, see `interrupted`)."""
        path = self.path / name
        path.write_bytes(self.finished[kind])
        if epochs is not None:
            state = torch.load(path, weights_only=True)
            state["recipe"]["epochs"] = epochs
            torch.save(state, path)
        return name

    def run(self, *args: str) -> tuple[int, str, str]:
        return main(self.capsys, *args)

    def interrupted(self, name: str, *flags: str, error: BaseException) -> tuple[int, str]:
        """Run `flags` into `name` until epoch 1 is saved, then raise `error` (Ctrl-C, a NaN)
        where train.py saves; returns the exit code and stderr."""
        after_save(self.monkeypatch, 1, error)
        code, _, err = self.run(*flags, "--save-model", name)
        self.monkeypatch.undo()
        self.monkeypatch.chdir(self.path)
        return code, err


def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile as it fails without a C++ compiler (the missing compiler is what this
    row is about, not the compile), wherever train.py's run takes it from."""
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    class NeedsACompiler(Uncompiled):  # torch.compile's wrapper, as it fails at its first call
        def forward(self, x):
            raise InductorError(InvalidCxxCompiler(), None)

    for module in ("utils", "train", "support.devices"):
        if hasattr(sys.modules.get(module), "compiled"):
            monkeypatch.setattr(sys.modules[module], "compiled",
                                lambda model, device: NeedsACompiler(model))


# ---------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------
def refusal(here: Here, *args: str) -> str:
    code, _, err = here.run(*args)
    assert code == 2, err
    return err


def finished_steplr_run_again(here: Here) -> str:
    return refusal(here, *SMALL, "--epochs", "1", "--save-model", here.file("s.pt", "step"))


def unfinished_steplr_run_again(here: Here) -> str:
    return refusal(here, *SMALL, "--save-model", here.file("s.pt", "step", epochs=2))


def finished_onecycle_run_again(here: Here) -> str:
    return refusal(here, *COMPACT, "--epochs", "2", "--save-model", here.file("k.pt", "onecycle"))


def onecycle_resumed_with_epochs(here: Here) -> str:
    return refusal(here, "--resume", here.file("k.pt", "onecycle"), "--epochs", "4")


def onecycle_resumed_when_finished(here: Here) -> str:
    return refusal(here, "--resume", here.file("k.pt", "onecycle"))


def onecycle_resumed_with_lr_midway(here: Here) -> str:
    code, _ = here.interrupted("k.pt", *COMPACT, "--epochs", "2", error=KeyboardInterrupt())
    assert code == 130
    return refusal(here, "--resume", "k.pt", "--lr", "0.1")


def ctrl_c_after_epoch_1(here: Here) -> str:
    code, err = here.interrupted("s.pt", *SMALL, "--epochs", "2", error=KeyboardInterrupt())
    assert code == 130, err
    return err


def disk_full_at_epoch_2(here: Here) -> str:
    full = OSError(errno.ENOSPC, "No space left on device")
    code, err = here.interrupted("s.pt", *SMALL, "--epochs", "2", error=full)
    assert code == 1, err
    return err


def metrics_unwritable_after_a_finished_run(here: Here) -> str:
    real = stopping.written

    def full_disk_for_metrics(what: str, write: Callable[[], object]) -> None:
        if what.startswith("write --metrics "):
            raise stopping.WriteFailed(f"could not {what}: No space left on device")
        real(what, write)

    here.monkeypatch.setattr(stopping, "written", full_disk_for_metrics)
    code, _, err = here.run(*SMALL, "--epochs", "1", "--save-model", "s.pt", "--metrics", "m.json")
    here.monkeypatch.undo()
    here.monkeypatch.chdir(here.path)
    assert code == 1 and not (here.path / "m.json").exists(), err
    return err


def no_compiler_after_epoch_1(here: Here) -> str:
    name = here.file("s.pt", "step", epochs=2)
    no_compiler(here.monkeypatch)
    code, _, err = here.run("--resume", name, "--compile")
    assert code == 1, err
    return err


def steplr_diverged_at_epoch_2(here: Here) -> str:
    code, err = here.interrupted("s.pt", *SMALL, "--epochs", "2", error=NonFiniteLoss(2, 1))
    assert code == 1, err
    return err


def onecycle_diverged_at_epoch_2(here: Here) -> str:
    code, err = here.interrupted("k.pt", *COMPACT, "--epochs", "2", error=NonFiniteLoss(2, 1))
    assert code == 1, err
    return err


@dataclass
class Row:
    provoke: Callable[[Here], str]  # make the situation in Here.path; return the message
    covers: tuple[str, ...]  # the functions whose words this row pastes (see the last test)
    commands: int  # how many commands the message suggests


TABLE: dict[str, Row] = {
    "a finished StepLR run, trained again": Row(
        finished_steplr_run_again, ("command_line.existing_checkpoint",), 2),
    "an unfinished run, trained again": Row(
        unfinished_steplr_run_again, ("command_line.existing_checkpoint",), 1),
    "a finished OneCycle run, trained again": Row(
        finished_onecycle_run_again, ("command_line.existing_checkpoint",
                                      "command_line.longer_run"), 2),
    "a finished OneCycle run resumed with --epochs": Row(
        onecycle_resumed_with_epochs, ("command_line.refuse_fixed_schedule",), 2),
    "a finished OneCycle run resumed": Row(
        onecycle_resumed_when_finished, ("command_line.refuse_fixed_schedule",), 2),
    "an unfinished OneCycle run resumed with --lr": Row(
        onecycle_resumed_with_lr_midway, ("command_line.refuse_fixed_schedule",), 2),
    "Ctrl-C after epoch 1": Row(ctrl_c_after_epoch_1, ("stopping.Status.report",), 1),
    "a full disk at epoch 2": Row(disk_full_at_epoch_2, ("stopping.Status.report",), 1),
    "--metrics unwritable after a finished run": Row(
        metrics_unwritable_after_a_finished_run, ("stopping.Status.report",), 1),
    "--compile without a compiler, after epoch 1": Row(
        no_compiler_after_epoch_1, ("stopping._no_compiler",), 1),
    "a StepLR run diverged at epoch 2": Row(
        steplr_diverged_at_epoch_2, ("stopping.report_divergence",), 1),
    "a OneCycle run diverged at epoch 2": Row(
        onecycle_diverged_at_epoch_2, ("stopping._onecycle_divergence",), 1),
}


# ---------------------------------------------------------------------------------------------
# The commands in a message, pasted; and what each must have done.
# ---------------------------------------------------------------------------------------------
SUGGESTED = re.compile(r"`(python train\.py [^`]*)`|^\s*(python train\.py .*)$|: (python train"
                       r"\.py .*)$", re.MULTILINE)


def suggested(message: str) -> list[str]:
    """Every `python train.py ...` in a message: in backticks, on a line of its own, or at
    the end of a line after a colon."""
    return [next(g for g in m.groups() if g) for m in SUGGESTED.finditer(message)]


def paste(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """As a shell runs the pasted line (its quoting included), with this Python."""
    assert command.startswith("python train.py ")
    line = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'train.py'))}" + command[15:]
    return subprocess.run(line, shell=True, cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=600)


def check_pasted(command: str, done: subprocess.CompletedProcess, cwd: Path,
                 before: dict[Path, bytes]) -> None:
    """The pasted command did what it says; `before` holds the checkpoints that were there."""
    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    assert_no_traceback(done)
    args = cli.build_parser().parse_args(shlex.split(command)[2:])
    if args.evaluate:
        assert re.search(r": test loss [\d.]+, accuracy [\d.]+% on [\d,]+ images$",
                         done.stdout.strip()), done.stdout
        assert all(p.read_bytes() == b for p, b in before.items())  # an evaluation writes none
        return
    out = cwd / (args.save_model or args.resume)
    saved = checkpoints.read_checkpoint(out)
    if args.resume:
        old = torch.load(io.BytesIO(before[cwd / args.resume]), weights_only=True)
        total = args.epochs or old["recipe"]["epochs"]
        assert saved["history"]["epoch"] == list(range(1, total + 1)), command
        done = len(old["history"]["epoch"])
        assert saved["history"]["test_acc"][:done] == old["history"]["test_acc"]  # kept
        if args.lr is not None:
            assert saved["history"]["lr"][-1] == args.lr, command
        if args.compile is not None:
            assert saved["recipe"]["compile"] is args.compile, command
        if args.metrics:  # the metrics of the run as saved
            written = json.loads((cwd / args.metrics).read_text())
            assert written["history"] == saved["history"], command
        return
    # A new run: the recipe it spells, into a file that was not there; the others untouched.
    assert out not in before, command
    assert saved["recipe"] == cli.recipe_from(args), command
    assert saved["history"]["epoch"] == list(range(1, saved["recipe"]["epochs"] + 1))
    assert all(p.read_bytes() == b for p, b in before.items())


@pytest.mark.parametrize("name", list(TABLE))
def test_every_suggested_command_does_what_its_message_says(name, tmp_path, mnist_dir, capsys,
                                                            monkeypatch, finished):
    row = TABLE[name]
    for i in range(row.commands):
        # Each command in a situation of its own: one may change what the next would find.
        here = Here(tmp_path / str(i), capsys, monkeypatch, finished)
        here.path.mkdir()
        (here.path / "data").symlink_to(mnist_dir.resolve(), target_is_directory=True)
        monkeypatch.chdir(here.path)
        message = row.provoke(here)
        monkeypatch.undo()
        commands = suggested(message)
        assert len(commands) == row.commands, message
        before = {p: p.read_bytes() for p in here.path.glob("*.pt")}
        check_pasted(commands[i], paste(commands[i], here.path), here.path, before)


# ---------------------------------------------------------------------------------------------
# No message goes unpasted: every function that words a suggested command has a row.
# ---------------------------------------------------------------------------------------------
# What builds a command's text; a function that calls one of these words a message with it.
BUILDERS = {"checkpoint_command", "new_run_command", "command", "longer_run"}


def wording_functions() -> set[str]:
    found = set()
    for source in [ROOT / "train.py", *sorted((ROOT / "support").glob("*.py"))]:
        tree = ast.parse(source.read_text())
        for qualname, fn in _functions(tree):
            if fn.name in BUILDERS and fn.name != "longer_run":
                continue  # a builder, not a message (longer_run words one: it picks the file)
            calls = {_called(c) for c in ast.walk(fn) if isinstance(c, ast.Call)}
            if calls & BUILDERS:
                found.add(f"{source.stem}.{qualname}")
    return found


def _called(call: ast.Call) -> str:
    """The name a call calls: Status.command only as a method (stopping.guarded's `command`
    argument is the whole train.py command, not a suggestion)."""
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    name = getattr(call.func, "id", "")
    return "" if name == "command" else name


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield f"{node.name}.{item.name}", item


def test_every_function_that_suggests_a_command_has_a_row():
    covered = {name for row in TABLE.values() for name in row.covers}
    assert wording_functions() - covered == set(), "add a row to TABLE for each"
    assert covered - wording_functions() == set(), "a row covers a function that is gone"
    assert command_line.existing_checkpoint  # the names above are the modules' own


def test_the_notebooks_helpers_suggest_no_command_line():
    """The table's rows are train.py's: the notebook's helpers (utils, and the checks and the
    resume behind its checkpoint pair) say what to change in a cell, never a command to paste,
    so there is none of theirs left out of the table."""
    for module in ("utils.py", "support/checkpoint_checks.py", "support/checkpoints.py"):
        tree = ast.parse((ROOT / module).read_text())
        texts = [node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        assert not [t for t in texts if re.search(r"python3? train\.py|python -m ", t)], module


@pytest.mark.slow
def test_a_hint_names_the_interpreter_and_script_as_they_were_run(tmp_path, mnist_dir):
    """train.py run by its path from another folder, with an interpreter PATH does not find:
    the hint names both as they were given, and pastes there as printed."""
    script = os.path.relpath(ROOT / "train.py", tmp_path)
    bare = {**env(), "PATH": "/usr/bin:/bin"}  # no venv on it
    flags = [*TINY_ARGS, "--epochs", "1", "--data-dir", str(mnist_dir), "--save-model", "a.pt"]
    for _ in range(2):  # the second run finds the first's finished checkpoint
        done = subprocess.run([sys.executable, script, *flags], cwd=tmp_path, env=bare,
                              capture_output=True, text=True, timeout=300)
    commands = [c for c in re.findall(r"`([^`]*--evaluate[^`]*)`", done.stderr)]
    assert commands, done.stderr
    assert commands[0].startswith(f"{shlex.quote(sys.executable)} {script} --evaluate a.pt")
    pasted = subprocess.run(commands[0], shell=True, cwd=tmp_path, env=bare,
                            capture_output=True, text=True, timeout=300)
    assert pasted.returncode == 0, pasted.stderr
    assert re.search(r"accuracy [\d.]+% on [\d,]+ images$", pasted.stdout.strip())
