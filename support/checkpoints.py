"""Checkpoints of a run: what one holds, how it is written, and how it is read back and checked.

A checkpoint is one dict, written by torch.save:

    model      the state_dict of the recipe's model, Net, CompactNet or SpeedNet (the plain
               module's, whether or not it trained compiled)
    optimizer  the SGD's state_dict
    scheduler  the StepLR's state_dict (the OneCycleLR's, for the recipe's schedule "onecycle"
               or "onecycle-batch")
    history    support.bookkeeping.new_history()'s columns, one value per finished epoch
    recipe     the run's recipe (the keys of support.recipe.RECIPE)
    rng        generator states: "torch" (the CPU's), "loader" (the train loader's, on its
               device), and "cuda" or "mps" when the run trained there (dropout masks)

`save_run` writes it to a temporary file and renames it over the old one, so a crash never
leaves half a checkpoint. `load_checkpoint` reads it with weights_only=True (no code in the
file can run), then checks every part by loading it into freshly built objects of the saved
recipe (its Net or CompactNet, and an SGD and a StepLR or OneCycleLR as support.recipe builds
them): a value of the wrong kind, or one that cannot have come from that recipe, is refused with
a CheckpointError that says what does not fit. A key the running torch does not write is not
applied; a key it needs is required.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from support import locks, outputs
from support.bookkeeping import new_history
from support.mnist_files import strip_colour
from support.recipe import (
    batches_per_epoch,
    check_recipe,
    is_int,
    is_real,
    make_model,
    make_optimizer,
    positive_real,
    steps_per_batch,
)

FORMAT = ("model", "optimizer", "scheduler", "history", "recipe", "rng")


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this model; nothing of it was run or loaded."""


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds: a run's state, and a run restored from one.
# ---------------------------------------------------------------------------------------------
def run_state(run: Any) -> dict[str, Any]:
    """Everything a resume needs. The random states: the CPU's, the loader's (on the loader's
    device), and the training device's own generator, which draws the dropout masks on CUDA
    and MPS."""
    rng = {"torch": torch.get_rng_state(), "loader": run.train_loader.generator.get_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    elif run.device.type == "mps":
        rng["mps"] = torch.mps.get_rng_state()
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "history": run.history,
            "recipe": run.recipe, "rng": rng}


def save_run(run: Any, path: str | os.PathLike) -> None:
    save_checkpoint(run_state(run), path)


def restore_run(run: Any, checkpoint: dict[str, Any]) -> None:
    """Continue `run` from a checkpoint that load_checkpoint returned."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.history = checkpoint["history"]
    _restore_rng(run, checkpoint["rng"])


def _restore_rng(run: Any, rng: dict[str, torch.Tensor]) -> None:
    """Random states that fit this device are restored; the others cannot carry over (a
    generator's state has another size on each device: CPU 5,056 bytes, CUDA 16, MPS 44),
    so they are named in one warning and the run goes on from fresh draws."""
    torch.set_rng_state(rng["torch"])
    lost = []
    try:
        run.train_loader.generator.set_state(rng["loader"])
    except RuntimeError:
        lost.append("the loader's shuffling and augmentation")
    saved_on = saved_device(rng)
    here = run.device.type
    if saved_on == here == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    elif saved_on == here == "mps":
        torch.mps.set_rng_state(rng["mps"])
    elif saved_on != here:
        lost.append("the dropout masks")
    if lost:
        print(f"warning: this checkpoint was saved on {saved_on} and resumes on {here}: "
              f"{' and '.join(lost)} start from fresh random draws, so the run will not "
              f"repeat an uninterrupted one draw for draw", file=sys.stderr)


def saved_device(rng: dict[str, Any]) -> str:
    """The device type a checkpoint's run trained on, read off its generator states."""
    return next((kind for kind in ("cuda", "mps") if kind in rng), "cpu")


def resume(run: Any, path: str | os.PathLike, retrain: bool = False) -> None:
    """The notebook's resume, and one line saying what it did: `run` (freshly built, see
    utils.build_run) is restored from `path` if that holds a run of its recipe (an unfinished
    one resumes, a finished one is loaded, not trained again), else left to start anew.
    Another recipe's run, or a file that is not a checkpoint, is refused (it says what
    differs and what to do) unless `retrain`, which also trains a finished run again."""
    for leftover in remove_partial_saves(path):
        print(f"removed {leftover}, left by a save that was cut short")
    epochs = run.recipe["epochs"]
    if not os.path.lexists(path):
        print(f"a new run: {epochs_text(epochs)}, each saved in {path}")
        return
    checkpoint, replaced = _notebook_checkpoint(path, run.recipe, retrain)
    if checkpoint is None:
        print(f"a new run (RETRAIN = True): {epochs_text(epochs)}, each saved in {path} "
              f"in place of {replaced}")
        return
    restore_run(run, checkpoint)
    done = len(run.history["epoch"])
    if done < epochs:
        print(f"resuming {path} after epoch {done} of {epochs}")
    else:
        print(f"loaded the finished run in {path} ({epochs_text(done)}): it is not trained again "
              f"(set RETRAIN = True to train it from scratch)")


def epochs_text(n: int) -> str:
    """'1 epoch', '20 epochs': how every message counts a run's epochs."""
    return f"{n} epoch{'' if n == 1 else 's'}"


def _notebook_checkpoint(path: str | os.PathLike, recipe: dict[str, Any], retrain: bool
                         ) -> tuple[dict[str, Any] | None, str]:
    """(the checkpoint to go on from, or None for a new run; what a new run replaces). An
    unfinished run of this recipe is resumed even with `retrain`, so that a run started with
    RETRAIN = True and interrupted continues when its cell runs again."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as err:
        if retrain:
            return None, "a file that is not a checkpoint of this model"
        raise CheckpointError(f"{err}. Set RETRAIN = True to start a new run in its place, or "
                              f"point CHECKPOINT at another file") from None
    saved = checkpoint["recipe"]
    differs = [f"{key} {saved[key]!r} (the notebook's: {value!r})"
               for key, value in recipe.items() if saved[key] != value]
    finished = len(checkpoint["history"]["epoch"]) >= saved["epochs"]
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
def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename over the old checkpoint:
    a crash or Ctrl-C mid-write leaves the previous checkpoint whole."""
    outputs.atomic_write(path, lambda f: torch.save(state, f))


def partial_saves(path: str | os.PathLike) -> list[Path]:
    """The temporary files of `save_checkpoint` for `path`: a save in progress, or one that
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


@contextmanager
def checkpoint_lock(path: str | os.PathLike) -> Iterator[list[Path]]:
    """Hold `path` for a run that saves to it: a second process refuses at once with
    CheckpointInUse. Inside, the temporary files of a killed save of `path` are deleted
    (yielded, so the caller can say so): no save of another run can be in progress.

        with checkpoints.checkpoint_lock("checkpoints/last.pt"):
            run.fit(on_epoch_end=lambda history: checkpoints.save_run(run, path))
    """
    try:
        lock = locks.acquire(lock_file(path), wait=False)
    except locks.Busy as err:
        holder = f"process {err.pid}" if err.pid else "another process"
        raise CheckpointInUse(f"{path} is in use by {holder}, which is training into it: wait "
                              f"for it to finish or stop it, or save to another file "
                              f"(--save-model OTHER.pt)") from None
    try:
        yield remove_partial_saves(path)
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# The load, and the checks of every part.
# ---------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True (no code in the file can run), then check every part of it
    (check_checkpoint) before anything uses it; CheckpointError says what does not fit."""
    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a checkpoint of this model ({reason})")

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise refuse("no such file") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
        raise refuse(_load_failure(err)) from None
    try:
        return check_checkpoint(checkpoint)
    except ValueError as err:
        raise refuse(strip_colour(str(err))) from None


def check_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """Every part a resume or an evaluation uses, checked against fresh objects of the saved
    recipe; returns the checkpoint with the recipe completed from RECIPE and the optimizer and
    scheduler states as the running torch writes them."""
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in FORMAT):
        raise ValueError(f"expected a dict with keys {', '.join(FORMAT)}")
    recipe = check_recipe(checkpoint["recipe"])
    net = _check_model(checkpoint["model"], recipe)
    optimizer = _check_optimizer(checkpoint["optimizer"], net, recipe)
    epochs = _check_history(checkpoint["history"])
    scheduler = _check_scheduler(checkpoint["scheduler"], net, recipe, epochs)
    rng = _check_rng(checkpoint["rng"], recipe)
    if recipe["epochs"] < epochs:
        raise ValueError(f"recipe says {recipe['epochs']} epochs, history holds {epochs}")
    return {**checkpoint, "recipe": recipe, "optimizer": optimizer, "scheduler": scheduler,
            "rng": rng}


def _real_list(v: Any) -> bool:
    return isinstance(v, list) and all(is_real(x) for x in v)


def _check_tensors_finite(tensors: dict[str, Any], what: str) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what} {name} is not a tensor")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what} {name} holds NaN or infinite values")


def _check_model(state: Any, recipe: dict[str, Any]) -> nn.Module:
    """The weights load strictly into the recipe's model (Net or CompactNet), every one is
    finite, and every BatchNorm's running variance is >= 0 (a negative one makes evaluation NaN)."""
    if not isinstance(state, dict):
        raise ValueError("model is not a state dict")
    net = make_model(recipe)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(" ".join(str(err).split())[:300]) from None
    _check_tensors_finite(state, "weight")
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d) and bool((module.running_var < 0).any()):
            raise ValueError(f"BatchNorm {name} has a negative running variance")
    return net


# Set by the StepLR schedule from the recipe's lr, and by --lr on resume.
LEARNING_RATES = ("lr", "initial_lr")


def _check_optimizer(state: Any, net: nn.Module, recipe: dict[str, Any]) -> dict[str, Any]:
    """An SGD state of this model's parameters whose hyperparameters are those make_optimizer
    builds from the recipe (the learning rate aside: StepLR and --lr change it); each momentum
    buffer a finite tensor of its parameter's shape. Returns the state as loaded."""
    fresh, _ = make_optimizer(net, recipe)
    expected = fresh.state_dict()["param_groups"]
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise ValueError("optimizer is not an optimizer's state dict")
    if len(state["param_groups"]) != len(expected):
        raise ValueError("optimizer of another model (another number of parameter groups)")
    groups = []
    for saved, want in zip(state["param_groups"], expected, strict=True):
        if not isinstance(saved, dict):
            raise ValueError("optimizer param group is not a dict")
        # A key this torch's SGD does not write would be copied onto the group: leave it out.
        groups.append({k: v for k, v in saved.items() if k in want})
    try:
        fresh.load_state_dict({**state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as err:
        raise ValueError(f"optimizer of another model ({str(err)[:120]})") from None
    for group, want in zip(fresh.param_groups, expected, strict=True):
        missing = sorted(set(want) - set(group))
        if missing:
            raise ValueError(f"optimizer lacks {', '.join(missing)}")
        for key in LEARNING_RATES:
            if key in group and not positive_real(group[key]):
                raise ValueError(f"optimizer {key}={str(group[key])[:40]} is not a number > 0")
        for key, value in want.items():
            if key not in ("params", *LEARNING_RATES) and group[key] != value:
                raise ValueError(f"optimizer {key}={str(group[key])[:40]} is not the "
                                 f"recipe's ({value})")
    for param, st in fresh.state.items():
        buf = st.get("momentum_buffer") if isinstance(st, dict) else st
        if buf is None:
            continue
        if not isinstance(buf, torch.Tensor) or buf.shape != param.shape:
            raise ValueError("optimizer momentum buffer does not fit its parameter")
        _check_tensors_finite({"momentum buffer": buf}, "optimizer")
    return fresh.state_dict()


# What defines each schedule; a scheduler's other keys are torch's bookkeeping, which a fresh
# one of the running torch provides when a checkpoint from another release lacks one.
SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "step": ("step_size", "gamma", "base_lrs", "last_epoch"),
    "onecycle": ("total_steps", "_schedule_phases", "cycle_momentum", "base_lrs", "last_epoch"),
}
SCHEDULE_KEYS["onecycle-batch"] = SCHEDULE_KEYS["onecycle"]  # the same scheduler, stepped per batch
SCHEDULERS = {"step": "StepLR", "onecycle": "OneCycleLR", "onecycle-batch": "OneCycleLR"}


def _check_scheduler(state: Any, net: nn.Module, recipe: dict[str, Any], epochs: int
                     ) -> dict[str, Any]:
    """A state of the recipe's schedule (StepLR, or OneCycleLR for schedule "onecycle" and
    "onecycle-batch"), stepped once per finished epoch (after each batch of every finished
    epoch for "onecycle-batch"): the keys a fresh one writes, each of the kind it writes
    (a key this torch does not write is left out), and the values the recipe sets. Returns
    the state to load."""
    expected = make_optimizer(net, recipe)[1].state_dict()
    schedule = recipe["schedule"]
    kind = SCHEDULERS[schedule]
    if not isinstance(state, dict):
        raise ValueError("scheduler is not a dict")
    missing = [key for key in SCHEDULE_KEYS[schedule] if key not in state]
    if missing:
        raise ValueError(f"scheduler lacks {', '.join(missing)}: not a {kind}")
    known = {k: v for k, v in state.items() if k in expected}
    for key, value in known.items():
        if not _same_kind(value, expected[key]):
            raise ValueError(f"scheduler {key}={str(value)[:40]} does not belong to a {kind}")
    # What the recipe fixes: StepLR's step and factor (its lr may change on resume); all of
    # OneCycle's shape, its epochs and peak included (a resume may change neither).
    fixed = (("step_size", "gamma") if schedule == "step" else
             ("total_steps", "_schedule_phases", "_anneal_func_type", "cycle_momentum",
              "base_lrs"))
    for key in fixed:
        if key in known and known[key] != expected[key]:
            raise ValueError(f"scheduler {key}={str(known[key])[:60]} is not the recipe's "
                             f"({str(expected[key])[:60]})")
    if len(known["base_lrs"]) != len(expected["base_lrs"]) or not all(
            positive_real(lr) for lr in known["base_lrs"]):
        raise ValueError("scheduler base_lrs do not match the optimizer")
    steps = epochs * (batches_per_epoch(recipe) if steps_per_batch(recipe) else 1)
    if known["last_epoch"] != steps:
        at = "step" if steps_per_batch(recipe) else "epoch"
        raise ValueError(f"scheduler at {at} {known['last_epoch']}, history at "
                         + (f"{epochs} epochs = step {steps}" if at == "step" else f"{epochs}"))
    return {**expected, **known}


def _same_kind(value: Any, reference: Any) -> bool:
    """`value` could stand where a fresh scheduler has `reference`."""
    if isinstance(reference, bool):
        return isinstance(value, bool)
    if isinstance(reference, int):
        return is_int(value)
    if isinstance(reference, float):
        return is_real(value)
    if isinstance(reference, list) and all(isinstance(r, dict) for r in reference):
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if isinstance(reference, list):
        return isinstance(value, list) and all(is_real(v) for v in value)
    return reference is None or type(value) is type(reference)


def _check_history(history: Any) -> int:
    """new_history's keys, each a list of finite numbers, all as long as `epoch` = 1..n.
    Returns n, the epochs finished."""
    keys = set(new_history())
    if not isinstance(history, dict) or set(history) != keys:
        raise ValueError(f"history needs exactly the keys {', '.join(sorted(keys))}")
    for key, values in history.items():
        if not _real_list(values):
            raise ValueError(f"history {key} is not a list of finite numbers")
    n = len(history["epoch"])
    if any(len(v) != n for v in history.values()) or history["epoch"] != list(range(1, n + 1)):
        raise ValueError("history columns do not line up with epochs 1..n")
    return n


def _check_rng(rng: Any, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every generator state fits a generator of its kind. The CPU's always can be tried; a
    CUDA or MPS state only where that device is here (elsewhere restore_run cannot use it and
    says so). Returns the states restore_run reads."""
    if not isinstance(rng, dict) or not {"torch", "loader"} <= set(rng):
        raise ValueError("rng needs the 'torch' and 'loader' generator states")
    states = {k: v for k, v in rng.items() if k in ("torch", "loader", "cuda", "mps")}
    for name, state in states.items():
        if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8
                and state.dim() == 1 and state.numel() > 0):
            raise ValueError(f"rng {name} is not a generator state (a 1-D uint8 tensor)")
    trained_on = saved_device(states)
    # The fast loader draws on the training device; the torchvision loader on the CPU.
    loader_on = trained_on if recipe["loader"] == "fast" else "cpu"
    for name, kind in (("torch", "cpu"), ("loader", loader_on), (trained_on, trained_on)):
        if name in states and not _fits_generator(states[name], kind):
            raise ValueError(f"rng {name} does not fit a {kind} generator "
                             f"({states[name].numel()} bytes)")
    return states


def _fits_generator(state: torch.Tensor, kind: str) -> bool:
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available[kind]:
        return True  # cannot be tried here, and restore_run will not use it
    try:
        torch.Generator(device=kind).set_state(state)
    except RuntimeError:
        return False
    return True


TORCH_ADVICE = ("weights_only", "Weights only load failed", "Check the documentation")
# Where torch names the object it refused, on a line of its own (2.4+) or after its advice on
# the same line (2.2 and older).
REFUSED_OBJECT = "WeightsUnpickler error:"


def _load_failure(err: BaseException) -> str:
    """Why torch.load failed, in words for a user. torch's own text leads with advice to load
    with weights_only=False, the one thing a user must not do with a file that is refused,
    so only its reason is kept."""
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
