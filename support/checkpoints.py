"""Checkpoints of a run: written whole, read back checked, held by one process, resumed from.

A checkpoint is one dict, written by torch.save (utils.save_checkpoint builds it in view):

    model      the state_dict of the recipe's model (the plain module's, compiled or not)
    optimizer  the SGD's state_dict
    scheduler  the state_dict of the recipe's schedule (StepLR, or OneCycleLR)
    history    support.bookkeeping.new_history()'s columns, one value per finished epoch
    recipe     the run's recipe (the keys of support.recipe.RECIPE)
    rng        generator states: "torch" (the CPU's), "loader" (the train loader's, on its
               device), and "cuda" or "mps" when the run trained there (dropout masks)

`write_checkpoint` writes a temporary file and renames it over the old one, so a crash never
leaves half a checkpoint. `read_checkpoint` loads with weights_only=True (no code in the file
can run), then checks every part (support/checkpoint_checks.py) before anything uses it.
`checkpoint_lock` and `hold` keep one process at a time training into a checkpoint.
"""

from __future__ import annotations

import atexit
import os
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from support import locks, outputs
from support.checkpoint_checks import FORMAT, check_checkpoint, saved_device  # noqa: F401
from support.mnist_files import strip_colour


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this model; nothing of it was run or loaded."""


class CheckpointInUse(RuntimeError):
    """Another process holds the checkpoint's lock; the message names its PID."""


# ---------------------------------------------------------------------------------------------
# The atomic write, and the checked read.
# ---------------------------------------------------------------------------------------------
def write_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """A crash or Ctrl-C mid-write leaves the previous checkpoint whole (outputs.atomic_write)."""
    outputs.atomic_write(path, lambda f: torch.save(state, f))


def remove_partial_saves(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of a killed save of `path` (SIGKILL, a power cut: every other
    failure removes its own); return them. Only the holder of `path`'s lock may: otherwise one
    may be another run's save in progress."""
    removed = []
    for leftover in outputs.scratch_files(path):
        try:
            leftover.unlink()
        except OSError:
            continue
        removed.append(leftover)
    return removed


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True (no code in the file can run), then check every part
    (check_checkpoint) before anything uses it; CheckpointError says what does not fit."""
    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a checkpoint of this model ({reason})")

    if os.path.isdir(path):
        raise refuse("a folder, not a checkpoint file")
    kind = outputs.odd_kind(path)
    if kind is not None:  # torch.load would wait on a FIFO for ever
        raise refuse(f"{kind}, not a regular file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise refuse("no such file") from None
    except Exception as err:
        raise refuse(_unloadable(path, err)) from None
    try:
        return check_checkpoint(checkpoint)
    except ValueError as err:
        raise refuse(strip_colour(str(err))) from None


ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of every file torch.save writes (a zip archive)


def _unloadable(path: str | os.PathLike, err: Exception) -> str:
    """Why torch.load refused `path`, in words for a user. torch's own text advises loading
    with weights_only=False, the one thing not to do with a refused file: it is not quoted."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as failed:
        return f"cannot be read: {failed.strerror or failed}"
    if not head:
        return "an empty file"
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):
        return ("cut short: it starts as a torch.save archive but does not end as one, as a "
                "copy or download that stopped early leaves it; copy it again, or use another "
                "checkpoint")
    unsafe = _unsafe_globals(path) if head == ZIP_MAGIC else []
    if unsafe:
        return (f"it holds code or objects that are not plain tensors ({', '.join(unsafe)}), "
                f"so it was refused and nothing in it ran")
    return f"not a file written by torch.save ({type(err).__name__})"


def _unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The code and classes a torch.save archive names beyond plain tensors (torch 2.5+ lists
    them; older releases cannot, and the file is then called not torch.save's)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        return find(path) if find is not None else []
    except Exception:
        return []


# ---------------------------------------------------------------------------------------------
# The lock: one run at a time on a checkpoint.
# ---------------------------------------------------------------------------------------------
def lock_file(path: str | os.PathLike) -> Path:
    """`.NAME.lock` beside the checkpoint (its target, so every name of one file shares it)."""
    file = outputs.target(path)
    return file.with_name(f".{file.name}.lock")


# The locks this process holds, by the file they guard: a notebook kernel keeps its checkpoint's
# until it exits, train.py its --save-model's for the run.
_HELD: dict[Path, locks.Lock] = {}


def _take(path: str | os.PathLike, other_file: str) -> list[Path]:
    """Take `path`'s lock, or say who has it; returns the leftovers of a killed save of it,
    now deleted (no save of another run can be in progress)."""
    try:
        _HELD[outputs.target(path)] = locks.acquire(lock_file(path), wait=False)
    except locks.Busy as err:
        holder = f"process {err.pid}" if err.pid else "another process"
        raise CheckpointInUse(f"{path} is in use by {holder}, which is training into it: wait "
                              f"for it to finish or stop it, or save to another file "
                              f"({other_file})") from None
    return remove_partial_saves(path)


def _release(path: str | os.PathLike) -> None:
    lock = _HELD.pop(outputs.target(path), None)
    problem = lock.release() if lock is not None else None
    if problem:  # its folder became read-only mid-run: say why the file stays
        print(f"warning: could not delete the lock file {lock.path} ({problem}); it holds "
              f"no lock now, and the next run on {path} takes it over", file=sys.stderr)


@contextmanager
def checkpoint_lock(path: str | os.PathLike) -> Iterator[list[Path]]:
    """Hold `path` for a run that saves to it (train.py's --save-model): a second process is
    refused at once with CheckpointInUse. Yields the leftovers of a killed save, deleted."""
    removed = _take(path, "--save-model OTHER.pt")
    try:
        yield removed
    finally:
        _release(path)


def hold(path: str | os.PathLike) -> None:
    """Hold `path` from now until this process exits (a notebook kernel), unless it does
    already; a path that cannot name a checkpoint file is refused first (ValueError). Says
    which leftovers of a killed save it deleted."""
    if outputs.target(path) in _HELD:
        return
    _check_file_path(path)
    for leftover in _take(path, "point CHECKPOINT at another file"):
        print(f"removed {leftover}, left by a save that was cut short")


def _check_file_path(path: str | os.PathLike) -> None:
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"CHECKPOINT {path} is a folder: name a file in it, such as "
                         f"{file / 'notebook.pt'}")
    parent = next((p for p in file.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"CHECKPOINT {path} is under {parent}, which is a file, not a folder: "
                         f"choose a path in a folder")


@atexit.register
def _release_all() -> None:
    for path in list(_HELD):
        _release(path)


# ---------------------------------------------------------------------------------------------
# The random states a resume needs.
# ---------------------------------------------------------------------------------------------
def rng_states(train_loader: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU's generator, the train loader's (on the loader's device), and the training
    device's own, which draws the dropout masks on CUDA and MPS."""
    rng = {"torch": torch.get_rng_state(), "loader": train_loader.generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        rng["mps"] = torch.mps.get_rng_state()
    return rng


def restore_rng(rng: dict[str, torch.Tensor], train_loader: Any, device: torch.device) -> None:
    """Random states that fit this device are restored; the others cannot carry over (a
    generator's state has another size on each device), so they are named in one warning and
    the run goes on from fresh draws."""
    torch.set_rng_state(rng["torch"])
    lost = []
    try:
        train_loader.generator.set_state(rng["loader"])
    except RuntimeError:
        lost.append("the loader's shuffling and augmentation")
    saved_on, here = saved_device(rng), device.type
    if saved_on == here == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    elif saved_on == here == "mps":
        torch.mps.set_rng_state(rng["mps"])
    elif saved_on != here:
        lost.append("the dropout masks")
    if lost:
        print(f"warning: this checkpoint was saved on {saved_on} and resumes on {here}: "
              f"{' and '.join(lost)} start from fresh random draws, so the run will not "
              f"repeat an uninterrupted one draw for draw", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The notebook's resume: which checkpoint to go on from, and what a stop leaves.
# ---------------------------------------------------------------------------------------------
def epochs_text(n: int) -> str:
    """'1 epoch', '20 epochs': how every message counts a run's epochs."""
    return f"{n} epoch{'' if n == 1 else 's'}"


# Recipe keys that say how a run trains, not what: a compiled run resumes without compiling.
HOW_NOT_WHAT = ("compile",)


def resumable(path: str | os.PathLike, recipe: dict[str, Any], retrain: bool = False,
              may_change: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The checked checkpoint in `path` to go on from, or None for a new run, with one line
    saying which. A run of `recipe` resumes (a finished one is loaded, not trained again);
    another recipe's run, or a file that is not a checkpoint, is refused (it says what differs
    and what to do) unless `retrain`, which also trains a finished run again. An unfinished run
    of this recipe resumes even with `retrain`, so that a run started with RETRAIN = True and
    interrupted goes on when its cell runs again. `may_change`: the recipe keys in which the
    run may differ from the saved one (train.py's resume flags)."""
    epochs = recipe["epochs"]
    if not os.path.lexists(path):
        print(f"a new run: {epochs_text(epochs)}, each saved in {path}")
        return None
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as err:
        if not retrain:
            raise CheckpointError(f"{err}. Set RETRAIN = True to start a new run in its place, "
                                  f"or point CHECKPOINT at another file") from None
        return _new_run(path, epochs, "a file that is not a checkpoint of this model")
    saved, done = checkpoint["recipe"], len(checkpoint["history"]["epoch"])
    differs = [f"{key} {saved[key]!r} (the notebook's: {value!r})"
               for key, value in recipe.items()
               if saved[key] != value and key not in (*may_change, *HOW_NOT_WHAT)]
    if retrain and (differs or done >= epochs):
        return _new_run(path, epochs, "another recipe's run" if differs else
                        "the finished run saved there")
    if differs:
        raise ValueError(f"{path} holds a run of another recipe, so it was not resumed: it has "
                         f"{'; '.join(differs)}. Set RETRAIN = True to train the notebook's "
                         f"recipe from scratch in its place, point CHECKPOINT at another file "
                         f"to keep it, or set the recipe back to the saved values")
    if done < epochs:
        print(f"resuming {path} after epoch {done} of {epochs}")
    else:
        print(f"loaded the finished run in {path} ({epochs_text(done)}): it is not trained again "
              f"(set RETRAIN = True to train it from scratch)")
    return checkpoint


def _new_run(path: str | os.PathLike, epochs: int, replaced: str) -> None:
    print(f"a new run (RETRAIN = True): {epochs_text(epochs)}, each saved in {path} in place "
          f"of {replaced}")


# The notebook's checkpoint in this process: its path, epochs saved and epochs of its recipe,
# so that a stop in the training cell can say which epoch a rerun goes on from.
_WATCHED: dict[str, Any] = {}


def watch(path: str | os.PathLike, done: int, epochs: int) -> None:
    """Note what `path` holds now (utils.load_checkpoint, in a notebook)."""
    _WATCHED.update(path=str(path), done=done, epochs=epochs)


def saved_after(path: str | os.PathLike, done: int) -> None:
    """Note that `path` now holds `done` epochs, if it is the watched checkpoint."""
    if _WATCHED.get("path") == str(path):
        _WATCHED["done"] = done


@contextmanager
def stop_says_what_is_saved() -> Iterator[None]:
    """The notebook's stop button, in the training or the test pass, says which epoch is
    saved and what running the cell again does."""
    try:
        yield
    except KeyboardInterrupt:
        if _WATCHED.get("done"):
            print(f"interrupted: epoch {_WATCHED['done']} of {_WATCHED['epochs']} is saved in "
                  f"{_WATCHED['path']}; run this cell again to go on from there")
        elif _WATCHED:
            print("interrupted before the first epoch was saved: running this cell again "
                  "starts the run over")
        raise
