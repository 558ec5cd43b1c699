"""Whether a checkpoint read back, or a training cell's objects, are what the recipe builds.

Both are held against objects freshly built from the recipe: each part loads strictly into its
fresh object, every setting must equal the fresh one's, every tensor is finite and of the dtype
built. The comparison cannot know three facts, so they are checked as such: the scheduler has
stepped once per finished epoch (per batch, for a per-batch schedule); the learning rate is the
one the schedule sets; each generator state has the size of its device's.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from support.bookkeeping import check_epoch_row, history_rows, new_history
from support.recipe import (
    batches_per_epoch,
    check_recipe,
    make_model,
    make_optimizer,
    steps_per_batch,
)

FORMAT = ("model", "optimizer", "scheduler", "history", "recipe", "rng")
# What LRScheduler.step moves; every other key of a scheduler's state is a setting.
PROGRESS = ("last_epoch", "_step_count", "_last_lr")


class Mismatch(ValueError):
    """A setting of a part that is not the one a fresh object of the recipe has."""

    def __init__(self, part: str, key: str, got: Any, want: Any) -> None:
        super().__init__(f"{part} {key}={str(got)[:60]} is not the recipe's ({str(want)[:60]})")
        self.part, self.key, self.got, self.want = part, key, got, want


class OffSchedule(ValueError):
    """A learning rate that is not the one the schedule sets: it was set by hand."""


def check_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """ValueError, saying what does not fit, unless every part of `checkpoint` loads into fresh
    objects of its recipe; returns it with the recipe completed and the optimizer's and
    scheduler's states as those objects hold them (as the running torch writes them)."""
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in FORMAT):
        raise ValueError(f"expected a dict with keys {', '.join(FORMAT)}")
    recipe = check_recipe(checkpoint["recipe"])
    rows = _check_history(checkpoint["history"])
    if recipe["epochs"] < len(rows):
        raise ValueError(f"recipe says {recipe['epochs']} epochs, history holds {len(rows)}")
    _, optimizer, scheduler = load_parts(recipe, rows, checkpoint["model"],
                                         checkpoint["optimizer"], checkpoint["scheduler"])
    return {**checkpoint, "recipe": recipe, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _check_rng(checkpoint["rng"], recipe)}


def load_parts(recipe: dict[str, Any], rows: list[dict[str, float]], model_state: Any,
               optimizer_state: Any, scheduler_state: Any) -> tuple[nn.Module, Any, Any]:
    """The recipe's model, SGD and schedule, freshly built, with these states loaded after
    `rows` (one per finished epoch); ValueError (a Mismatch for a setting) where one does not
    fit. Nothing is drawn from torch's generator: a check must not change the run it checks."""
    with torch.random.fork_rng(devices=[]):
        model = make_model(recipe)
    built_optimizer, built_scheduler = make_optimizer(model, recipe)
    optimizer, scheduler = make_optimizer(model, recipe)
    _load_model(model, model_state)
    _check_kind(scheduler_state, built_scheduler)
    _load_optimizer(optimizer, optimizer_state, built_optimizer)
    _load_scheduler(scheduler, scheduler_state, built_scheduler, recipe, len(rows))
    rate = _scheduled_rate(model, recipe, scheduler.state_dict(), rows)
    for name, now in (("the optimizer's lr", [g["lr"] for g in optimizer.param_groups]),
                      ("the scheduler's _last_lr", scheduler.get_last_lr())):
        if not _same(now, rate):
            after = f" after epoch {len(rows)} at lr {rows[-1]['lr']!r}" if rows else ""
            raise OffSchedule(f"{name} is {str(now[0])[:40]}, but the schedule sets "
                              f"{rate[0]!r}{after}")
    return model, optimizer, scheduler


def _steps_after(recipe: dict[str, Any], epochs: int) -> int:
    """Where the recipe's scheduler stands after `epochs` finished epochs."""
    return epochs * (batches_per_epoch(recipe) if steps_per_batch(recipe) else 1)


def _scheduled_rate(model: nn.Module, recipe: dict[str, Any], state: dict[str, Any],
                   rows: list[dict[str, float]]) -> list[float]:
    """The rate the schedule in `state` sets at its step: a fresh one as built, or one step on
    from the rate the last epoch recorded (StepLR scales the rate it is given, so a rate set by
    hand is carried on; train.py's --lr on resume is recorded so in the history; OneCycle
    computes its rate from its step alone)."""
    optimizer, scheduler = make_optimizer(model, recipe)
    if not rows:
        return [group["lr"] for group in optimizer.param_groups]
    scheduler.load_state_dict({**state, "last_epoch": state["last_epoch"] - 1})
    for group in optimizer.param_groups:
        group["lr"] = rows[-1]["lr"]
    with warnings.catch_warnings():  # "step() before optimizer.step()": this SGD never steps
        warnings.simplefilter("ignore")
        scheduler.step()
    return scheduler.get_last_lr()


def _same(got: Any, want: Any) -> bool:
    """Equal, and of the same kind: True is not 1, nor "0" 0; a number is a number, int or
    float (another release may write 0 where this one writes 0.0)."""
    if isinstance(want, (list, tuple)):
        return (type(got) is type(want) and len(got) == len(want)
                and all(_same(g, w) for g, w in zip(got, want, strict=True)))
    if isinstance(want, dict):
        return (isinstance(got, dict) and set(got) == set(want)
                and all(_same(got[k], w) for k, w in want.items()))
    if _is_number(want):
        return _is_number(got) and got == want
    return type(got) is type(want) and got == want


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_tensors(state: dict[str, Any], want: dict[str, torch.Tensor], what: str) -> None:
    """Each tensor of `state` has the dtype of the one built (a load casts it without a word)
    and its shape, and is finite."""
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what} {name} is not a tensor")
        if t.dtype != want[name].dtype:
            raise ValueError(f"{what} {name} is {t.dtype}, the model's {want[name].dtype}")
        if t.shape != want[name].shape:
            raise ValueError(f"{what} {name} does not fit its parameter ({tuple(t.shape)})")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what} {name} holds NaN or infinite values")


def _load_model(model: nn.Module, state: Any) -> None:
    if not isinstance(state, dict):
        raise ValueError("model is not a state dict")
    try:
        with warnings.catch_warnings():  # a complex weight: its refusal is _check_tensors'
            warnings.simplefilter("ignore")
            model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"the model's layers are not the recipe's "
                         f"({' '.join(str(err).split())[:300]})") from None
    _check_tensors(state, model.state_dict(), "weight")
    for name, module in model.named_modules():  # a negative one makes evaluation NaN
        if isinstance(module, nn.BatchNorm2d) and bool((module.running_var < 0).any()):
            raise ValueError(f"BatchNorm {name} has a negative running variance")


def _load_optimizer(optimizer: Any, state: Any, built: Any) -> None:
    """Every setting of every group that of the SGD built (the rate aside: the schedule's rule
    holds it); each buffer fits its parameter. A key this torch does not write is left out."""
    want = built.state_dict()["param_groups"]
    if (not isinstance(state, dict) or not isinstance(state.get("param_groups"), list)
            or not all(isinstance(g, dict) for g in state["param_groups"])):
        raise ValueError("optimizer is not an optimizer's state dict")
    groups = [{k: v for k, v in saved.items() if k in mine}
              for saved, mine in zip(state["param_groups"], want, strict=False)]
    try:
        optimizer.load_state_dict({**state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as err:
        raise ValueError(f"optimizer of another model ({str(err)[:120]})") from None
    for group, mine in zip(optimizer.state_dict()["param_groups"], want, strict=True):
        for key, value in mine.items():
            if key not in group:
                raise ValueError(f"optimizer lacks {key}")
            if key not in ("params", "lr") and not _same(group[key], value):
                raise Mismatch("optimizer", key, group[key], value)
    by_index = dict(zip((i for g in groups for i in g["params"]),
                        (p for g in optimizer.param_groups for p in g["params"]), strict=True))
    for index, buffers in state.get("state", {}).items():
        if index not in by_index or not isinstance(buffers, dict):
            raise ValueError("optimizer state of another model")
        kept = {k: v for k, v in buffers.items() if v is not None}  # momentum 0 keeps None
        _check_tensors(kept, {k: by_index[index] for k in kept}, "optimizer")


def _check_kind(state: Any, built: Any) -> None:
    """A state of the schedule built: its public keys (the private ones are torch's
    bookkeeping, which another release may not write)."""
    if not isinstance(state, dict):
        raise ValueError("scheduler is not a dict")
    missing = [k for k in built.state_dict() if not k.startswith("_") and k not in state]
    if missing:
        raise ValueError(f"scheduler lacks {', '.join(missing)}: not a {type(built).__name__}")


def _load_scheduler(scheduler: Any, state: Any, built: Any, recipe: dict[str, Any],
                    epochs: int) -> None:
    """The settings of the schedule built, stepped once per finished epoch (after every batch
    of one, for a per-batch schedule). A key this torch does not write is left out; a private
    one it writes and the file lacks (another release's bookkeeping) is the fresh one's."""
    want = built.state_dict()
    loaded = {**want, **{k: v for k, v in state.items() if k in want}}
    for key, value in want.items():
        if key not in PROGRESS and not _same(loaded[key], value):
            raise Mismatch("scheduler", key, loaded[key], value)
    at, steps = loaded["last_epoch"], _steps_after(recipe, epochs)
    if type(at) is not int:
        raise ValueError(f"scheduler last_epoch={str(at)[:40]} is not a count of steps")
    if at != steps:
        raise ValueError(f"scheduler at step {at}, history at {epochs} epochs = step {steps}"
                         if steps_per_batch(recipe) else
                         f"scheduler at epoch {at}, history at {epochs}")
    scheduler.load_state_dict(loaded)


def _check_history(history: Any) -> list[dict[str, float]]:
    """new_history's columns, one finite number per finished epoch, each row one the loop
    could have appended (check_epoch_row: a 999% accuracy is no history); returns the rows."""
    keys = set(new_history())
    if not isinstance(history, dict) or set(history) != keys:
        raise ValueError(f"history needs exactly the keys {', '.join(sorted(keys))}")
    if not all(isinstance(v, list) for v in history.values()) or len(
            {len(v) for v in history.values()}) != 1:
        raise ValueError("history columns do not line up with epochs 1..n")
    rows = history_rows(history)
    for epoch, row in enumerate(rows, start=1):
        check_epoch_row(row, epoch)
        if not all(math.isfinite(v) for v in row.values()):
            raise ValueError(f"history epoch {epoch} holds NaN or infinite values")
    return rows


def _check_rng(rng: Any, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each generator state has the size of a fresh generator's of its device, where that
    device is here (elsewhere the resume cannot use it, and says so); returns the states."""
    if not isinstance(rng, dict) or not {"torch", "loader"} <= set(rng):
        raise ValueError("rng needs the 'torch' and 'loader' generator states")
    states = {k: v for k, v in rng.items() if k in ("torch", "loader", "cuda", "mps")}
    trained_on = saved_device(states)
    # The fast loader draws on the training device; the torchvision loader on the CPU.
    devices = {"torch": "cpu", "loader": trained_on if recipe["loader"] == "fast" else "cpu",
               "cuda": "cuda", "mps": "mps"}
    for name, state in states.items():
        want = _generator_state(devices[name])
        if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8
                and state.dim() == 1 and state.numel() > 0
                and (want is None or state.numel() == want.numel())):
            raise ValueError(f"rng {name} is not a {devices[name]} generator's state")
    return states


def _generator_state(device: str) -> torch.Tensor | None:
    here = {"cpu": True, "cuda": torch.cuda.is_available(),
            "mps": torch.backends.mps.is_available()}
    return torch.Generator(device=device).get_state() if here[device] else None


def saved_device(rng: dict[str, Any]) -> str:
    """The device type a checkpoint's run trained on, read off its generator states."""
    return next((kind for kind in ("cuda", "mps") if kind in rng), "cpu")


# ---------------------------------------------------------------------------------------------
# A training cell's objects: of the classes built, then their states by the same comparison.
# ---------------------------------------------------------------------------------------------
def check_objects(model: nn.Module, optimizer: Any, scheduler: Any, recipe: dict[str, Any],
                  rows: list[dict[str, float]]) -> None:
    """ValueError, in one line that says what to change, unless `model`, `optimizer` and
    `scheduler` are what the recipe builds, trained for `rows` (one per finished epoch), each
    driving the one before it."""
    recipe = check_recipe(recipe)
    plain = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the model
    if recipe["compile"] != (plain is not model):
        raise ValueError("recipe['compile'] is True but the model is not compiled: compiling is "
                         "train.py's switch (its --compile flag)" if recipe["compile"] else
                         "the model is compiled but recipe['compile'] is False: set it to True "
                         "so that the checkpoint says how the run trained")
    with torch.random.fork_rng(devices=[]):
        fresh = make_model(recipe)
    fixes = {"model": f"build the model the recipe names (train.py's --model {recipe['model']} "
                      f"trains it)",
             "optimizer": "build torch.optim.SGD as the training cell does",
             "scheduler": "build the recipe's schedule, or set recipe['schedule'] to the one "
                          "you built"}
    for (what, fix), given, built in zip(fixes.items(), (plain, optimizer, scheduler),
                                         (fresh, *make_optimizer(fresh, recipe)), strict=True):
        if type(given) is not type(built):
            raise ValueError(f"the {what} is {type(given).__name__}, not the recipe's "
                             f"{type(built).__name__}: {fix}")
    if _dropouts(plain) != _dropouts(fresh):
        raise ValueError(f"the model's dropout is {_dropouts(plain)}, the recipe's "
                         f"{_dropouts(fresh)}: set recipe['dropout'] and build the model from it")
    try:
        _load_model(fresh, plain.state_dict())
    except ValueError as err:
        raise ValueError(f"{err}: build the model from the recipe, or change the recipe to say "
                         f"what the model is") from None
    updated = [p for group in optimizer.param_groups for p in group["params"]]
    if len(updated) != len(list(plain.parameters())) or any(
            a is not b for a, b in zip(updated, plain.parameters(), strict=False)):
        raise ValueError("the optimizer updates another model's parameters (was the model "
                         "built again after the optimizer?): build the optimizer from this "
                         "model, e.g. run the whole training cell again")
    if scheduler.optimizer is not optimizer:
        raise ValueError("the scheduler drives another optimizer (was the optimizer built "
                         "again after it?): run the whole training cell again")
    _check_states(plain, optimizer, scheduler, recipe, rows)


def _check_states(model: nn.Module, optimizer: Any, scheduler: Any, recipe: dict[str, Any],
                  rows: list[dict[str, float]]) -> None:
    """load_parts of the objects' states, its refusal worded for the training cell."""
    try:
        load_parts(recipe, rows, model.state_dict(), optimizer.state_dict(),
                   scheduler.state_dict())
    except Mismatch as err:
        kind = "SGD" if err.part == "optimizer" else type(scheduler).__name__
        fix = (f"build {kind} with {err.key}=recipe[{err.key!r}], or change recipe[{err.key!r}] "
               f"so that the checkpoint records it" if err.key in recipe else
               f"build {kind} from the recipe as the training cell does, or change the recipe")
        raise ValueError(f"the {'optimizer' if kind == 'SGD' else kind}'s {err.key} is "
                         f"{err.got!r}, the recipe's {err.want!r}: {fix}") from None
    except OffSchedule as err:
        raise ValueError(f"{err}: leave the learning rate to the schedule, or change "
                         f"recipe['lr'] so that the checkpoint records it") from None
    except ValueError as err:
        raise ValueError(f"{err}: build the model, SGD and schedule from the recipe, as the "
                         f"training cell does") from None


def _dropouts(model: nn.Module) -> list[float]:
    """The probability of each dropout of a model, nn.Dropout or the fast path's fused one."""
    return [float(m.p) for m in model.modules()
            if isinstance(m, nn.Dropout) or type(m).__name__ == "ReLUDropout"]
