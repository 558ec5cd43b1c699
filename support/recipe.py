"""The recipe: every setting of a run, in one dict that travels in every checkpoint and metrics
file. First the write-up's settings, then the switches this project adds (experiments and
speed), whose defaults reproduce the write-up. A key the recipe does not know is a mistake,
and every value is checked (RECIPE_RULES) before a checkpoint's recipe builds anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model import (
    DROPOUT,
    DROPOUT_PLANS,
    HEADS,
    MAX_WIDTH,
    SPEED_DROPOUT,
    TINY_DROPOUT,
    TRANSITIONS,
    CompactNet,
    Net,
    SpeedNet,
    TinyNet,
)
from support.augment import AUGMENTATIONS

# The write-up's recipe: SGD with momentum, StepLR, 20 epochs of batch 128.
WRITE_UP: dict[str, Any] = {
    "epochs": 20,  # passes over the 60,000 training images
    "batch_size": 128,  # training images per SGD step
    "test_batch_size": 1000,  # test images per forward pass (evaluation only)
    "lr": 0.01,  # SGD's learning rate
    "momentum": 0.9,  # SGD's momentum
    "step_size": 15,  # StepLR: the learning rate drops after this many epochs...
    "gamma": 0.1,  # ...multiplied by this
    "seed": 1,  # fixes the weights, the shuffling, the augmentation and the dropout masks
}
# This project's switches; each default is the write-up's choice, every key a train.py flag.
SWITCHES: dict[str, Any] = {
    "model": "s6",  # "s6": the write-up's Net; "compact": CompactNet, with the COMPACT recipe;
    # "speedrun": SpeedNet, with the SPEEDRUN recipe; "tiny": TinyNet, with the TINY recipe
    "schedule": "step",  # "step": StepLR (step_size, gamma); "onecycle": OneCycleLR, peak lr,
    # stepped once per epoch; "onecycle-batch": the same stepped after every batch
    "nesterov": False,  # SGD's Nesterov momentum (the speedrun's)
    "dropout": DROPOUT,  # the probability of each nn.Dropout in the model
    "loader": "fast",  # "fast": whole batches on the device; "torchvision": the original's
    "dropout_plan": "table",  # blocks followed by dropout (model.DROPOUT_PLANS)
    "batch_norm": True,  # False: no BatchNorm anywhere (the ablation; convs get a bias)
    "transitions": "bn-relu",  # the 1x1 reductions as Conv-BN-ReLU, or "bare" (ablation)
    "head": "conv",  # the table's 3x3 conv6, or "gap": global average pool + 1x1 conv
    "width": 1.0,  # every channel count times this (model.scaled_channels; the width sweep)
    "augmentation": "both",  # crop-resize and rotation; "rotate", "crop" or "none" (ablation)
    "compile": False,  # train through torch.compile (devices.compiled)
    "deterministic": False,  # ask PyTorch for deterministic kernels (devices.use_deterministic)
    "limit_train": None,  # use only the first N training images (None: all 60,000)
    "limit_test": None,  # and the first N test images (None: all 10,000)
}
RECIPE: dict[str, Any] = {**WRITE_UP, **SWITCHES}
# The compact model's named recipe (issue 27; the search behind it is in docs/compact.md): what
# `train.py --model compact` changes from RECIPE, for every key the user does not give.
COMPACT: dict[str, Any] = {
    "model": "compact",
    "epochs": 15,
    "lr": 0.2,  # OneCycle's peak
    "schedule": "onecycle",  # stepped once per epoch: total_steps = epochs
    "dropout": 0.02,  # after every 3x3 block of CompactNet
    "augmentation": "rotate",  # rotation only: the ablation found it carries the most
}
# The speedrun's named recipe (issue 33; the exploration behind it is in docs/speedrun.md):
# `train.py --model speedrun`, 99.4% on a laptop CPU in about a minute.
SPEEDRUN: dict[str, Any] = {
    "model": "speedrun",
    "epochs": 8,
    "lr": 0.2,  # OneCycle's peak
    "schedule": "onecycle-batch",  # stepped after every batch: a smooth warm-up and decay
    "nesterov": True,
    "dropout": SPEED_DROPOUT,  # one nn.Dropout, on the 32 channel averages
    "augmentation": "rotate",
}
# The tiny model's named recipe (issue 38; the search behind it is in docs/tiny.md):
# `train.py --model tiny`, every seed past 99.4% below 3,762 parameters.
TINY: dict[str, Any] = {
    "model": "tiny",
    "epochs": 15,
    "batch_size": 32,  # four times the speedrun's steps per epoch: the public anchor's batch
    "lr": 0.1,  # OneCycle's peak: the second search's choice over 0.05 (docs/tiny.md)
    "schedule": "onecycle-batch",
    "nesterov": True,
    "dropout": TINY_DROPOUT,  # one nn.Dropout, on the 16 channel averages
    "augmentation": "rotate",
}
# Each model's named recipe: RECIPE with these values.
NAMED: dict[str, dict[str, Any]] = {"s6": {}, "compact": COMPACT, "speedrun": SPEEDRUN,
                                   "tiny": TINY}
MEAN, STD = 0.1307, 0.3081  # of MNIST's training pixels: inputs are normalised with these
NET_OPTIONS = ("dropout_plan", "batch_norm", "transitions", "head", "width", "dropout")
# The options of each model: Net's architecture switches apply to Net only.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {"s6": NET_OPTIONS, "compact": ("dropout",),
                                             "speedrun": ("dropout",),
                                             "tiny": ("dropout", "width")}
MODELS = {"s6": Net, "compact": CompactNet, "speedrun": SpeedNet, "tiny": TinyNet}
SCHEDULES = ("step", "onecycle", "onecycle-batch")
ONECYCLES = ("onecycle", "onecycle-batch")  # a OneCycle's length and peak are fixed at its start
TRAIN_IMAGES = 60_000  # MNIST's training set: a per-batch schedule's length depends on it


def full_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The named recipe of `recipe`'s model (RECIPE for the write-up's, the default) with
    `recipe`'s values; a key RECIPE does not know is a mistake, not a setting."""
    unknown = sorted(set(recipe) - set(RECIPE))
    if unknown:
        raise ValueError(f"unknown recipe keys: {', '.join(unknown)} "
                         f"(known: {', '.join(RECIPE)})")
    named = NAMED.get(recipe.get("model", RECIPE["model"]), {})
    return {**RECIPE, **named, **recipe}


def net_options(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's choices of architecture, as its model's keyword arguments."""
    recipe = full_recipe(recipe)
    return {key: recipe[key] for key in MODEL_OPTIONS[recipe["model"]]}


def make_model(recipe: dict[str, Any]) -> nn.Module:
    """The recipe's model, freshly built (its weights drawn from torch's generator)."""
    recipe = full_recipe(recipe)
    return MODELS[recipe["model"]](**net_options(recipe))


def foreign_options(recipe: dict[str, Any]) -> list[str]:
    """Net's architecture switches set away from RECIPE in a recipe of another model: they
    would be ignored, so they are refused."""
    recipe = full_recipe(recipe)
    return [key for key in NET_OPTIONS if key not in MODEL_OPTIONS[recipe["model"]]
            and recipe[key] != RECIPE[key]]


# ---------------------------------------------------------------------------------------------
# The checks of a recipe read from a file: each value of the type a run needs.
# ---------------------------------------------------------------------------------------------
def is_int(v: Any) -> bool:
    """An int that is not a bool (True is an int to Python, not a setting)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return is_int(v) and v > 0


def _optional_positive_int(v: Any) -> bool:
    return v is None or _positive_int(v)


def positive_real(v: Any) -> bool:
    return is_real(v) and v > 0


def _non_negative_real(v: Any) -> bool:
    return is_real(v) and v >= 0


RECIPE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (_positive_int, "a positive integer"),
    "batch_size": (_positive_int, "a positive integer"),
    "test_batch_size": (_positive_int, "a positive integer"),
    "lr": (positive_real, "a finite number > 0"),
    "momentum": (_non_negative_real, "a finite number >= 0"),
    "step_size": (_positive_int, "a positive integer"),
    "gamma": (positive_real, "a finite number > 0"),
    "seed": (lambda v: is_int(v) and -(2**63) <= v < 2**64, "an integer torch can seed with"),
    "model": (lambda v: isinstance(v, str) and v in MODELS, f"one of {', '.join(MODELS)}"),
    "schedule": (lambda v: isinstance(v, str) and v in SCHEDULES,
                 f"one of {', '.join(SCHEDULES)}"),
    "nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "dropout": (lambda v: is_real(v) and 0 <= v < 1, "a number >= 0 and < 1"),
    "loader": (lambda v: v in ("fast", "torchvision"), "'fast' or 'torchvision'"),
    "dropout_plan": (lambda v: isinstance(v, str) and v in DROPOUT_PLANS,
                     f"one of {', '.join(DROPOUT_PLANS)}"),
    "batch_norm": (lambda v: isinstance(v, bool), "true or false"),
    "transitions": (lambda v: isinstance(v, str) and v in TRANSITIONS,
                    f"one of {', '.join(TRANSITIONS)}"),
    "head": (lambda v: isinstance(v, str) and v in HEADS, f"one of {', '.join(HEADS)}"),
    "width": (lambda v: positive_real(v) and v <= MAX_WIDTH,
              f"a number > 0 and <= {MAX_WIDTH:g}"),
    "augmentation": (lambda v: isinstance(v, str) and v in AUGMENTATIONS,
                     f"one of {', '.join(AUGMENTATIONS)}"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "deterministic": (lambda v: isinstance(v, bool), "true or false"),
    "limit_train": (_optional_positive_int, "None or a positive integer"),
    "limit_test": (_optional_positive_int, "None or a positive integer"),
}


def check_recipe(recipe: Any) -> dict[str, Any]:
    """RECIPE completed with `recipe` (an older checkpoint may lack newer keys), every value
    of the type a run needs; ValueError names the first that is not."""
    if not isinstance(recipe, dict):
        raise ValueError("recipe is not a dict")
    full = full_recipe(recipe)
    for key, (ok, what) in RECIPE_RULES.items():
        if not ok(full[key]):
            raise ValueError(f"recipe {key}={full[key]!r} is not {what}")
    foreign = foreign_options(full)
    if foreign:
        raise ValueError(f"recipe {', '.join(foreign)}: only for the s6 model, not for "
                         f"{full['model']!r}")
    if full["nesterov"] and full["momentum"] == 0:  # torch's SGD refuses it
        raise ValueError("recipe nesterov=True needs a momentum above 0")
    return full


def steps_per_batch(recipe: dict[str, Any]) -> bool:
    """Whether the recipe's scheduler is stepped after every batch (utils.train steps it) rather
    than once at the end of each epoch (the epoch loop does)."""
    return full_recipe(recipe)["schedule"] == "onecycle-batch"


def batches_per_epoch(recipe: dict[str, Any]) -> int:
    """Training batches in one epoch: every loader keeps the last, shorter batch."""
    recipe = full_recipe(recipe)
    images = min(recipe["limit_train"] or TRAIN_IMAGES, TRAIN_IMAGES)
    return math.ceil(images / recipe["batch_size"])


def schedule_steps(recipe: dict[str, Any]) -> int:
    """How many times the scheduler is stepped over the whole run: once per batch or once per
    epoch. A finished epoch leaves the scheduler at epochs done times steps per epoch."""
    recipe = full_recipe(recipe)
    return recipe["epochs"] * (batches_per_epoch(recipe) if steps_per_batch(recipe) else 1)


# OneCycle stepped per batch warms up over its first quarter (torch's default is 0.3): with a
# handful of epochs, the time at high rates is where the speedrun's accuracy comes from
# (docs/speedrun.md). The per-epoch OneCycle keeps torch's default, as its results were run.
BATCH_ONECYCLE_WARMUP = 0.25


def make_optimizer(model: nn.Module, recipe: dict[str, Any]) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with momentum and a StepLR schedule, as the write-up (and the notebook, in view);
    with schedule "onecycle", a OneCycleLR to the peak `lr` instead (the compact recipe),
    stepped once per epoch like StepLR, so its total_steps is the epochs; with "onecycle-batch"
    the same stepped after every batch (the speedrun), as OneCycle's authors meant it. OneCycle
    keeps the recipe's momentum (no momentum cycling); `nesterov` makes it Nesterov's."""
    recipe = full_recipe(recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"],
                                momentum=recipe["momentum"], nesterov=recipe["nesterov"])
    if recipe["schedule"] in ONECYCLES:
        steps = schedule_steps(recipe)
        # At least two warm-up steps: torch's OneCycleLR divides by zero when its warm-up ends
        # at step 0 (a run of 4 steps in all); a full run's 3,752 steps are not affected.
        warmup = ({"pct_start": max(BATCH_ONECYCLE_WARMUP, 2 / steps) if steps >= 4 else
                   BATCH_ONECYCLE_WARMUP} if steps_per_batch(recipe) else {})
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"],
                                                        total_steps=steps,
                                                        cycle_momentum=False, **warmup)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe["step_size"],
                                                    gamma=recipe["gamma"])
    return optimizer, scheduler
