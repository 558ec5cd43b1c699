"""The checks of a checkpoint: every part of a file read back, and the objects a notebook or
train.py hands in, each held against what the saved recipe builds.

`check_checkpoint` runs on every file before anything of it is used: each part loads into
freshly built objects of the saved recipe (its Net or CompactNet, an SGD and a StepLR or
OneCycleLR as support.recipe builds them), so a value of the wrong kind, or one that cannot
have come from that recipe, is refused with a ValueError that says what does not fit. A key the
running torch does not write is not applied; a key it needs is required.

`check_objects` runs before the first epoch and at every save: the model, optimizer and
scheduler of a training cell must be the recipe's (an edited momentum, schedule or head would
otherwise be saved into a checkpoint that nothing can load).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from support.bookkeeping import check_epoch_row, history_rows, new_history
from support.recipe import (
    MODELS,
    batches_per_epoch,
    check_recipe,
    full_recipe,
    is_int,
    is_real,
    make_model,
    make_optimizer,
    positive_real,
    steps_per_batch,
)

FORMAT = ("model", "optimizer", "scheduler", "history", "recipe", "rng")


def fresh_model(recipe: dict[str, Any]) -> nn.Module:
    """The recipe's model, to compare with, built without drawing from torch's generator: a
    check must not change the draws of the run it checks (its resume would differ from an
    unbroken run's)."""
    with torch.random.fork_rng(devices=[]):
        return make_model(recipe)


# ---------------------------------------------------------------------------------------------
# The objects of a training cell, against its recipe.
# ---------------------------------------------------------------------------------------------
def check_objects(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  recipe: dict[str, Any]) -> None:
    """ValueError, in one line that says what to change, unless `model`, `optimizer` and
    `scheduler` are what the recipe builds: the recipe's model (its layers, shapes and dropout),
    an SGD over that model's own parameters with the recipe's settings, and the recipe's
    schedule over that SGD."""
    recipe = full_recipe(recipe)
    plain = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the model
    if recipe["compile"] != (plain is not model):
        raise ValueError("recipe['compile'] is True but the model is not compiled: compiling is "
                         "train.py's switch (its --compile flag)" if recipe["compile"] else
                         "the model is compiled but recipe['compile'] is False: set it to True "
                         "so that the checkpoint says how the run trained")
    fresh = fresh_model(recipe)
    _check_model_object(plain, fresh, recipe)
    want_optimizer, want_scheduler = make_optimizer(fresh, recipe)
    _check_optimizer_object(optimizer, plain, want_optimizer, recipe)
    _check_scheduler_object(scheduler, optimizer, want_scheduler, recipe)


def _check_model_object(model: nn.Module, fresh: nn.Module, recipe: dict[str, Any]) -> None:
    built = MODELS[recipe["model"]]
    hint = (f"build the model the recipe names (train.py's --model {recipe['model']} trains "
            f"it)")
    if not isinstance(model, nn.Module) or type(model) is not built:
        raise ValueError(f"the recipe's model is {recipe['model']!r}, a {built.__name__}, not the "
                         f"{type(model).__name__} given: {hint}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if shapes != want:
        differs = sorted(set(shapes) ^ set(want)) or [
            k for k in want if shapes[k] != want[k]]
        raise ValueError(f"the model's layers are not the recipe's (they differ at "
                         f"{', '.join(differs[:3])}): build it with the recipe's options, or "
                         f"change the recipe to say what the model is")
    if _dropouts(model) != _dropouts(fresh):
        raise ValueError(f"the model's dropout is {_dropouts(model)}, the recipe's "
                         f"{_dropouts(fresh)}: set recipe['dropout'] and build the model from it")


def _dropouts(model: nn.Module) -> list[float]:
    """The probability of each dropout of a model, nn.Dropout or the fast path's fused one."""
    return [float(m.p) for m in model.modules()
            if isinstance(m, nn.Dropout) or type(m).__name__ == "ReLUDropout"]


def _check_optimizer_object(optimizer: Any, model: nn.Module, want: torch.optim.Optimizer,
                            recipe: dict[str, Any]) -> None:
    if type(optimizer) is not type(want):
        raise ValueError(f"the optimizer is a {type(optimizer).__name__}, the recipe's an "
                         f"{type(want).__name__}: build torch.optim.SGD as the training cell does")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != len(list(model.parameters())) or any(
            a is not b for a, b in zip(params, model.parameters(), strict=False)):
        raise ValueError("the optimizer updates another model's parameters (was the model "
                         "built again after the optimizer?): build the optimizer from this "
                         "model, e.g. run the whole training cell again")
    got, expected = optimizer.param_groups[0], want.param_groups[0]
    for key, value in expected.items():
        if key in ("params", "lr", "initial_lr"):
            continue  # the schedule moves the learning rate, and a resume may set it
        if got.get(key) != value:
            fix = (f"build SGD with {key}=recipe[{key!r}], or change recipe[{key!r}] so that the "
                   f"checkpoint records it" if key in recipe else
                   "build SGD as the training cell does")
            raise ValueError(f"the optimizer's {key} is {got.get(key)!r}, the recipe's {value!r}: "
                             f"{fix}")


def _check_scheduler_object(scheduler: Any, optimizer: Any, want: Any,
                            recipe: dict[str, Any]) -> None:
    kind = type(want).__name__
    if type(scheduler) is not type(want):
        raise ValueError(f"the scheduler is a {type(scheduler).__name__}, the recipe's schedule "
                         f"{recipe['schedule']!r} is a {kind}: build the recipe's schedule, or "
                         f"set recipe['schedule'] to the one you built")
    if scheduler.optimizer is not optimizer:
        raise ValueError("the scheduler drives another optimizer (was the optimizer built "
                         "again after it?): run the whole training cell again")
    # The learning rate the schedule started from, and the one it set last: SGD built with
    # another lr, or its lr set by hand, would train at a rate the recipe does not record.
    started, expected = optimizer.param_groups[0].get("initial_lr"), want.optimizer.param_groups[
        0]["initial_lr"]
    if started != expected:
        raise ValueError(f"the optimizer's learning rate at the schedule's start is {started!r}, "
                         f"the recipe's {expected!r}: build SGD with lr=recipe['lr'], or change "
                         f"recipe['lr'] so that the checkpoint records it")
    now, last = optimizer.param_groups[0]["lr"], scheduler.get_last_lr()[0]
    if now != last:
        raise ValueError(f"the optimizer's lr is {now!r}, but its schedule set {last!r}: leave "
                         f"the learning rate to the schedule, or change recipe['lr']")
    for key in SHAPE_KEYS[recipe["schedule"]]:
        got, expected = getattr(scheduler, key, None), getattr(want, key, None)
        if got != expected:
            setting = {"step_size": "step_size", "gamma": "gamma",
                       "total_steps": "epochs"}.get(key, key)
            raise ValueError(f"the {kind}'s {key} is {got!r}, the recipe's {expected!r}: build "
                             f"it from recipe[{setting!r}], or change the recipe")


# What a scheduler object is built from, per schedule.
SHAPE_KEYS: dict[str, tuple[str, ...]] = {"step": ("step_size", "gamma"),
                                          "onecycle": ("total_steps",),
                                          "onecycle-batch": ("total_steps",)}


# ---------------------------------------------------------------------------------------------
# A file read back: every part.
# ---------------------------------------------------------------------------------------------
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
    net = fresh_model(recipe)
    kinds = {k: v.dtype for k, v in net.state_dict().items()}
    cast = sorted(k for k, v in state.items()
                  if isinstance(v, torch.Tensor) and k in kinds and v.dtype != kinds[k])
    if cast:  # load_state_dict would cast them without a word
        raise ValueError(f"weight {cast[0]} is {state[cast[0]].dtype}, the model's "
                         f"{kinds[cast[0]]}")
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
    for epoch, row in enumerate(history_rows(history), start=1):
        check_epoch_row(row, epoch)  # the rule a saved row met: a 999% accuracy is no history
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


def saved_device(rng: dict[str, Any]) -> str:
    """The device type a checkpoint's run trained on, read off its generator states."""
    return next((kind for kind in ("cuda", "mps") if kind in rng), "cpu")


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


