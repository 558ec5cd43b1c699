"""Checkpoints of a run: how one is written, read back, resumed from, and held.

A checkpoint is one dict, written by torch.save (utils.save_checkpoint builds it in view):

    model      the state_dict of the recipe's model, Net, CompactNet or SpeedNet (the plain
               module's, whether or not it trained compiled)
    optimizer  the SGD's state_dict
    scheduler  the StepLR's state_dict (the OneCycleLR's, for the recipe's schedule "onecycle"
               or "onecycle-batch")
    history    support.bookkeeping.new_history()'s columns, one value per finished epoch
    recipe     the run's recipe (the keys of support.recipe.RECIPE)
    rng        generator states: "torch" (the CPU's), "loader" (the train loader's, on its
               device), and "cuda" or "mps" when the run trained there (dropout masks)

`write_checkpoint` writes it to a temporary file and renames it over the old one, so a crash
never leaves half a checkpoint. `read_checkpoint` reads it with weights_only=True (no code in
the file can run), then checks every part (support/checkpoint_checks.py) before anything uses
it. `hold` keeps one process at a time training into a checkpoint.
"""

from __future__ import annotations

import atexit
import os
import sys
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
    generator's state has another size on each device: CPU 5,056 bytes, CUDA 16, MPS 44),
    so they are named in one warning and the run goes on from fresh draws."""
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
# The notebook's resume: which checkpoint to go on from, and one line saying so.
# ---------------------------------------------------------------------------------------------
def resumable(path: str | os.PathLike, recipe: dict[str, Any], retrain: bool = False,
              may_change: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The checked checkpoint in `path` to go on from, or None for a new run, with one line
    saying which. A run of `recipe` resumes (a finished one is loaded, not trained again);
    another recipe's run, or a file that is not a checkpoint, is refused (it says what differs
    and what to do) unless `retrain`, which also trains a finished run again. `may_change`:
    the recipe keys in which the run may differ from the saved one (train.py's resume flags)."""
    epochs = recipe["epochs"]
    if not os.path.lexists(path):
        print(f"a new run: {epochs_text(epochs)}, each saved in {path}")
        return None
    checkpoint, replaced = _notebook_checkpoint(path, recipe, retrain, may_change)
    if checkpoint is None:
        print(f"a new run (RETRAIN = True): {epochs_text(epochs)}, each saved in {path} "
              f"in place of {replaced}")
        return None
    done = len(checkpoint["history"]["epoch"])
    if done < epochs:
        print(f"resuming {path} after epoch {done} of {epochs}")
    else:
        print(f"loaded the finished run in {path} ({epochs_text(done)}): it is not trained again "
              f"(set RETRAIN = True to train it from scratch)")
    return checkpoint


# The notebook's checkpoint in this process: its path, epochs saved and epochs of its recipe,
# so that a Ctrl-C in the training cell can say which epoch a rerun goes on from.
_WATCHED: dict[str, Any] = {}


def watch(path: str | os.PathLike, done: int, epochs: int) -> None:
    """Note what `path` holds now (utils.load_checkpoint and save_checkpoint, in a notebook)."""
    _WATCHED.update(path=str(path), done=done, epochs=epochs)


def saved_after(path: str | os.PathLike, done: int) -> None:
    if _WATCHED.get("path") == str(path):
        _WATCHED["done"] = done


@contextmanager
def stop_says_what_is_saved() -> Iterator[None]:
    """The notebook's stop button, in the training or the test pass, says which epoch a rerun
    goes on from."""
    try:
        yield
    except KeyboardInterrupt:
        say_what_is_saved()
        raise


def say_what_is_saved() -> None:
    """After a Ctrl-C in the notebook's loop: which epoch is saved, and what a rerun does."""
    if not _WATCHED:
        return
    if _WATCHED["done"]:
        print(f"interrupted: epoch {_WATCHED['done']} of {_WATCHED['epochs']} is saved in "
              f"{_WATCHED['path']}; run this cell again to go on from there")
    else:
        print("interrupted before the first epoch was saved: running this cell again starts "
              "the run over")


def epochs_text(n: int) -> str:
    """'1 epoch', '20 epochs': how every message counts a run's epochs."""
    return f"{n} epoch{'' if n == 1 else 's'}"


# Recipe keys that say how a run trains, not what: a compiled run resumes without compiling.
HOW_NOT_WHAT = ("compile",)


def _notebook_checkpoint(path: str | os.PathLike, recipe: dict[str, Any], retrain: bool,
                         may_change: tuple[str, ...]) -> tuple[dict[str, Any] | None, str]:
    """(the checkpoint to go on from, or None for a new run; what a new run replaces). An
    unfinished run of this recipe is resumed even with `retrain`, so that a run started with
    RETRAIN = True and interrupted continues when its cell runs again."""
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as err:
        if retrain:
            return None, "a file that is not a checkpoint of this model"
        raise CheckpointError(f"{err}. Set RETRAIN = True to start a new run in its place, or "
                              f"point CHECKPOINT at another file") from None
    saved = checkpoint["recipe"]
    differs = [f"{key} {saved[key]!r} (the notebook's: {value!r})"
               for key, value in recipe.items()
               if saved[key] != value and key not in (*may_change, *HOW_NOT_WHAT)]
    finished = len(checkpoint["history"]["epoch"]) >= recipe["epochs"]
    if not differs and (not finished or not retrain):
        return checkpoint, ""
    if retrain:
        return None, "the finished run saved there" if not differs else "another recipe's run"
    raise ValueError(f"{path} holds a run of another recipe, so it was not resumed: it has "
                     f"{'; '.join(differs)}. Set RETRAIN = True to train the notebook's recipe "
                     f"from scratch in its place, point CHECKPOINT at another file to keep it, "
                     f"or set the recipe back to the saved values")


# ---------------------------------------------------------------------------------------------
# The atomic write.
# ---------------------------------------------------------------------------------------------
def write_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename over the old checkpoint:
    a crash or Ctrl-C mid-write leaves the previous checkpoint whole."""
    outputs.atomic_write(path, lambda f: torch.save(state, f))


def partial_saves(path: str | os.PathLike) -> list[Path]:
    """The temporary files of `write_checkpoint` for `path`: a save in progress, or one that
    was killed mid-write (SIGKILL, a power cut), since every other failure removes its own."""
    return outputs.scratch_files(path)


def remove_partial_saves(path: str | os.PathLike) -> list[Path]:
    """Delete the leftovers of an earlier crashed save of `path`; return what was deleted.
    Only a holder of checkpoint_lock(path) may call it: otherwise a leftover may be another
    run's save in progress."""
    removed = []
    for leftover in partial_saves(path):
        try:
            leftover.unlink()
        except OSError:
            continue
        removed.append(leftover)
    return removed


# ---------------------------------------------------------------------------------------------
# The lock: one run at a time on a checkpoint.
# ---------------------------------------------------------------------------------------------
class CheckpointInUse(RuntimeError):
    """Another process holds the checkpoint's lock; the message names its PID."""


def lock_file(path: str | os.PathLike) -> Path:
    """`.NAME.lock` beside the checkpoint (its target, so every name of one file shares it)."""
    file = outputs.target(path)
    return file.with_name(f".{file.name}.lock")


# The locks this process holds, by the file they guard: a notebook kernel keeps its checkpoint's
# until it exits, and train.py its --save-model's for the run (checkpoint_lock).
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
    if lock is None:
        return
    problem = lock.release()
    if problem:  # its folder became read-only mid-run: say why the file stays
        print(f"warning: could not delete the lock file {lock.path} ({problem}); it holds "
              f"no lock now, and the next run on {path} takes it over", file=sys.stderr)


@contextmanager
def checkpoint_lock(path: str | os.PathLike) -> Iterator[list[Path]]:
    """Hold `path` for a run that saves to it: a second process refuses at once with
    CheckpointInUse. Inside, the temporary files of a killed save of `path` are deleted
    (yielded, so the caller can say so): no save of another run can be in progress.

        with checkpoints.checkpoint_lock("checkpoints/last.pt"):
            ...  # train, saving with utils.save_checkpoint after every epoch
    """
    removed = _take(path, "--save-model OTHER.pt")
    try:
        yield removed
    finally:
        _release(path)


def hold(path: str | os.PathLike) -> None:
    """Hold `path` for this process from now until it exits (a notebook kernel), unless it
    does already; another kernel or train.py on the same file is refused with CheckpointInUse.
    A path that cannot be a checkpoint file (a folder, a path under a file) is refused first.
    Says which leftovers of a killed save it deleted."""
    if outputs.target(path) in _HELD:
        return
    check_file_path(path)
    for leftover in _take(path, "point CHECKPOINT at another file"):
        print(f"removed {leftover}, left by a save that was cut short")


def check_file_path(path: str | os.PathLike) -> None:
    """ValueError, saying what to give instead, unless `path` can name a checkpoint file."""
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
# The load, and the checks of every part (support/checkpoint_checks.py).
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True (no code in the file can run), then check every part of it
    (check_checkpoint) before anything uses it; CheckpointError says what does not fit."""
    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a checkpoint of this model ({reason})")

    kind = outputs.odd_kind(path)
    if kind is not None:  # torch.load would wait on a FIFO for ever
        raise refuse(f"{kind}, not a regular file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise refuse("no such file") from None
    except Exception as err:
        raise refuse(_load_failure(err, path)) from None
    try:
        return check_checkpoint(checkpoint)
    except ValueError as err:
        raise refuse(strip_colour(str(err))) from None


TORCH_ADVICE = ("weights_only", "Weights only load failed", "Check the documentation")
# Where torch names the object it refused, on a line of its own (2.4+) or after its advice on
# the same line (2.2 and older).
REFUSED_OBJECT = "WeightsUnpickler error:"


# The first bytes of every file torch.save writes (a zip archive), and what torch says when
# such a file does not end as one: it was cut short (a copy, an upload, a disk that filled).
ZIP_MAGIC = b"PK\x03\x04"
CUT_SHORT = ("failed finding central directory", "failed reading zip archive")


def _cut_short(err: BaseException, path: str | os.PathLike | None) -> str | None:
    """Why a file that is empty, or starts as torch.save's archive but does not end as one,
    failed to load; None for any other file."""
    try:
        with open(path, "rb") as f:  # type: ignore[arg-type]
            head = f.read(len(ZIP_MAGIC))
    except (OSError, TypeError):
        return None
    if not head:
        return "an empty file"
    if head == ZIP_MAGIC and (isinstance(err, (OSError, EOFError))
                              or any(w in str(err) for w in CUT_SHORT)):
        return ("cut short: it starts as a torch.save archive but does not end as one, as a "
                "copy or download that stopped early leaves it; copy it again, or use another "
                "checkpoint")
    return None


def _load_failure(err: BaseException, path: str | os.PathLike | None = None) -> str:
    """Why torch.load failed, in words for a user. torch's own text leads with advice to load
    with weights_only=False, the one thing a user must not do with a file that is refused,
    so only its reason is kept. A file cut short is named so, not "not written by torch.save"."""
    if not isinstance(err, IsADirectoryError):
        cut = _cut_short(err, path)
        if cut is not None:
            return cut
    text = strip_colour(str(err))
    if REFUSED_OBJECT in text:
        reasons = [text.split(REFUSED_OBJECT, 1)[1].strip().splitlines()[0].strip()]
    else:
        lines = [s.strip() for s in text.splitlines() if s.strip()]
        reasons = [s for s in lines if not any(a in s for a in TORCH_ADVICE)]
    reason = reasons[0][:200] if reasons and reasons[0] else type(err).__name__
    if reason.isdigit():  # e.g. a text file: torch says only which byte it could not read
        reason = f"{type(err).__name__} at byte value {reason}"
    if any(word in reason for word in ("GLOBAL", "global", "Unsupported class")):
        return (f"it holds code or objects that are not plain tensors ({reason}), so it was "
                f"refused and nothing in it ran")
    if isinstance(err, IsADirectoryError):
        return "a folder, not a checkpoint file"
    return f"not a file written by torch.save: {reason}"
