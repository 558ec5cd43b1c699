"""The recipe: every setting of a run, one frozen `Recipe`, checked once when it is made.

Each field carries its rule (`Rule`: its type, limits or choices, its help text, what a resume
or an evaluation may change), and that one rule checks a flag's text, a checkpoint's value and
the notebook's dict alike. First the write-up's settings, then the switches this project adds,
whose defaults reproduce the write-up; the named recipes (compact, speedrun, tiny) are values
of it. A checkpoint holds `Recipe.as_dict()`, a plain dict, so `weights_only` loads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
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

MAX_INT = 2**31 - 1  # far above any sensible size, and safe for every tensor index
MODELS = {"s6": Net, "compact": CompactNet, "speedrun": SpeedNet, "tiny": TinyNet}
# Each schedule's keys fixed at its start: a resume cannot change them and stay on its curve.
# OneCycle's length (epochs, or every batch of every epoch) and peak lr are fixed.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "step": (), "onecycle": ("epochs", "lr"),
    "onecycle-batch": ("epochs", "lr", "batch_size", "limit_train")}
ONECYCLES = ("onecycle", "onecycle-batch")
MEAN, STD = 0.1307, 0.3081  # of MNIST's training pixels: inputs are normalised with these
TRAIN_IMAGES = 60_000  # MNIST's training set: a per-batch schedule's length depends on it


@dataclass(frozen=True)
class Rule:
    """What one recipe value may be, and what it means."""

    help: str
    kind: type = int  # int, float (an int is accepted too), bool or str
    low: float | None = None  # the least value allowed...
    high: float | None = None  # ...and the most
    open_low: bool = False  # low itself excluded (a rate > 0)
    open_high: bool = False  # high itself excluded (a dropout < 1)
    choices: tuple[str, ...] = ()
    optional: bool = False  # None allowed, meaning "all of them"
    on_resume: bool = False  # a resume may change it, from its next epoch on
    on_evaluate: bool = False  # an evaluation applies it (the rest is the checkpoint's)
    group: str = "recipe"  # the --help section of its flag

    def words(self) -> str:
        """What a value must be, as the refusal says it."""
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.kind is int:
            text = f"an integer from {self.low:,} to {self.high:,}"
        else:
            limits = [f"{'>' if self.open_low else '>='} {self.low:g}"] + (
                [] if self.high is None else [f"{'<' if self.open_high else '<='} {self.high:g}"])
            text = f"a finite number {' and '.join(limits)}"
        return f"None or {text}" if self.optional else text

    def holds(self, v: Any) -> bool:
        if v is None:
            return self.optional
        if self.kind is bool or self.choices:
            return isinstance(v, self.kind) and (not self.choices or v in self.choices)
        if isinstance(v, bool) or not isinstance(v, (int, float) if self.kind is float else int):
            return False  # True is an int to Python, not a setting
        low_ok = v > self.low if self.open_low else v >= self.low
        high_ok = self.high is None or (v < self.high if self.open_high else v <= self.high)
        return math.isfinite(v) and low_ok and high_ok

    def parse(self, text: str) -> Any:
        """A flag's value from its text (argparse's `type`): a ValueError for a malformed
        number, argparse's "invalid integer value"; an ArgumentTypeError beyond the limits."""
        import argparse

        value = self.kind(text)
        if not self.holds(value):
            raise argparse.ArgumentTypeError(f"must be {self.words()}, got {text}")
        return value


def _key(default: Any, rule: Rule) -> Any:
    return field(default=default, metadata={"rule": rule})


POSITIVE = {"low": 1, "high": MAX_INT}
REAL = {"kind": float, "low": 0}


@dataclass(frozen=True)
class Recipe:
    """A run's settings; made only with every value valid (see `Recipe.of`)."""

    # The write-up's recipe: SGD with momentum, StepLR, 20 epochs of batch 128.
    epochs: int = _key(20, Rule("total epochs to train", **POSITIVE, on_resume=True))
    batch_size: int = _key(128, Rule("training images per SGD step", **POSITIVE))
    test_batch_size: int = _key(1000, Rule("test images per forward pass", **POSITIVE,
                                           on_evaluate=True))
    lr: float = _key(0.01, Rule("SGD's learning rate, OneCycle's peak with --schedule onecycle",
                                **REAL, open_low=True, on_resume=True))
    momentum: float = _key(0.9, Rule("SGD's momentum", **REAL))
    step_size: int = _key(15, Rule("StepLR: epochs between learning-rate drops", **POSITIVE))
    gamma: float = _key(0.1, Rule("StepLR: factor of each drop", **REAL, open_low=True))
    seed: int = _key(1, Rule("fixes the weights, the shuffling, the augmentation and the "
                             "dropout masks", low=-(2**63), high=2**64 - 1))
    # This project's switches; each default is the write-up's choice.
    model: str = _key("s6", Rule(
        "s6 = the write-up's Net; compact = CompactNet (7,594 parameters); speedrun = "
        "SpeedNet, the laptop-CPU speedrun (docs/speedrun.md); tiny = TinyNet (3,672 "
        "parameters, docs/tiny.md). The named recipe of compact, speedrun or tiny "
        "(support/recipe.py NAMED) then fills in every recipe flag not given",
        str, choices=tuple(MODELS)))
    schedule: str = _key("step", Rule(
        "step = StepLR (--step-size, --gamma); onecycle = OneCycleLR peaking at --lr, stepped "
        "once per epoch, its last epoch at lr / 250,000 (so it needs --epochs 2 or more; a "
        "resume follows it to its end); onecycle-batch = the same stepped after every batch",
        str, choices=tuple(SCHEDULES)))
    nesterov: bool = _key(False, Rule("SGD with Nesterov momentum (needs --momentum above 0)",
                                      bool))
    dropout: float = _key(DROPOUT, Rule("probability of each dropout layer in the model",
                                        **REAL, high=1, open_high=True))
    loader: str = _key("fast", Rule(
        "fast: data kept and augmented on the device, and the model run with fused "
        "ReLU-dropout (plus, on the CPU, channels-last memory and keep_freed_memory); see "
        "devices.fast_path. torchvision: the original per-sample pipeline and model",
        str, choices=("fast", "torchvision"), group="data"))
    dropout_plan: str = _key("table", Rule(
        "blocks followed by dropout: table = conv1 and conv2, as the original's table; every = "
        "every 3x3 block; none", str, choices=tuple(DROPOUT_PLANS), group="model variants"))
    batch_norm: bool = _key(True, Rule(
        "BatchNorm after each conv but the last; --no-batch-norm (ablation) removes it and "
        "gives every conv a bias", bool, group="model variants"))
    transitions: str = _key("bn-relu", Rule(
        "the two 1x1 reductions: bn-relu = Conv-BN-ReLU, as the table; bare = a plain 1x1 "
        "conv (ablation)", str, choices=TRANSITIONS, group="model variants"))
    head: str = _key("conv", Rule(
        "conv = the table's 3x3 conv6 from 3x3 to 1x1; gap = global average pooling, then a "
        "1x1 conv to 10 classes", str, choices=HEADS, group="model variants"))
    width: float = _key(1.0, Rule(
        "multiply every channel count by this, rounded to the nearest integer (the width "
        "sweep)", **REAL, open_low=True, high=MAX_WIDTH, group="model variants"))
    augmentation: str = _key("both", Rule(
        "both = the original's 10%% crop-resize and ±15° rotation; rotate or crop = only one "
        "of them; none (ablation)", str, choices=tuple(AUGMENTATIONS)))
    compile: bool = _key(False, Rule(
        "train through torch.compile (needs a C++ compiler on the CPU; not on MPS); on "
        "--resume, --no-compile continues a compiled run without it", bool, on_resume=True,
        group="run"))
    deterministic: bool = _key(False, Rule(
        "deterministic kernels and no TF32 on CUDA (slower); the CPU is deterministic for a "
        "given thread count anyway", bool, group="run"))
    limit_train: int | None = _key(None, Rule("use only the first N training images",
                                              **POSITIVE, optional=True, group="data"))
    limit_test: int | None = _key(None, Rule("use only the first N test images", **POSITIVE,
                                             optional=True, on_evaluate=True, group="data"))

    def __post_init__(self) -> None:
        for key, rule in RULES.items():
            if not rule.holds(getattr(self, key)):
                raise ValueError(f"recipe {key}={getattr(self, key)!r} is not {rule.words()}")
        foreign = foreign_options(self.as_dict())
        if foreign:
            models = takers(foreign[0])
            raise ValueError(f"recipe {', '.join(foreign)}: only for the {' and '.join(models)} "
                             f"model{'s' * (len(models) > 1)}, not for {self.model!r}")
        if self.nesterov and self.momentum == 0:  # torch's SGD refuses it
            raise ValueError("recipe nesterov=True needs a momentum above 0")

    @classmethod
    def of(cls, values: Mapping[str, Any] | Recipe) -> Recipe:
        """The named recipe of `values`' model with `values` (a checkpoint's may lack newer
        keys), every value checked."""
        if isinstance(values, Recipe):
            return values
        if not isinstance(values, Mapping):
            raise ValueError("recipe is not a dict")
        return cls(**full_recipe(values))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def per_batch(self) -> bool:
        """Whether the scheduler is stepped after every batch (utils.train steps it) rather
        than once at the end of each epoch (the epoch loop does)."""
        return self.schedule == "onecycle-batch"


RULES: dict[str, Rule] = {f.name: f.metadata["rule"] for f in dataclasses.fields(Recipe)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Recipe)}
# Each model's options (its keyword arguments); the rest of ARCHITECTURE it does not take.
ARCHITECTURE = ("dropout_plan", "batch_norm", "transitions", "head", "width", "dropout")
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {"s6": ARCHITECTURE, "compact": ("dropout",),
                                             "speedrun": ("dropout",),
                                             "tiny": ("dropout", "width")}


def foreign_options(values: Mapping[str, Any]) -> list[str]:
    """Architecture options set away from their default that the model does not take: they
    would be ignored, so they are refused."""
    model = values.get("model", "s6")
    return [key for key in ARCHITECTURE if key not in MODEL_OPTIONS.get(model, ARCHITECTURE)
            and values.get(key, DEFAULTS[key]) != DEFAULTS[key]]


def takers(key: str) -> list[str]:
    """The models that take architecture option `key`."""
    return [name for name, options in MODEL_OPTIONS.items() if key in options]


# The named recipes: what `train.py --model NAME` changes from the defaults, for every key the
# user does not give (the searches behind them: docs/compact.md, speedrun.md, tiny.md).
NAMED: dict[str, dict[str, Any]] = {
    "s6": {},
    "compact": {"model": "compact", "epochs": 15, "lr": 0.2,  # OneCycle's peak
                "schedule": "onecycle",  # stepped once per epoch: total_steps = epochs
                "dropout": 0.02,  # after every 3x3 block of CompactNet
                "augmentation": "rotate"},  # rotation only: the ablation found it carries most
    "speedrun": {"model": "speedrun", "epochs": 8, "lr": 0.2,
                 "schedule": "onecycle-batch",  # stepped after every batch: smooth warm-up
                 "nesterov": True,
                 "dropout": SPEED_DROPOUT,  # one nn.Dropout, on the 32 channel averages
                 "augmentation": "rotate"},
    "tiny": {"model": "tiny", "epochs": 15,
             "batch_size": 32,  # four times the speedrun's steps per epoch: the anchor's batch
             "lr": 0.1,  # OneCycle's peak: the second search's choice over 0.05 (docs/tiny.md)
             "schedule": "onecycle-batch", "nesterov": True,
             "dropout": TINY_DROPOUT,  # one nn.Dropout, on the 16 channel averages
             "augmentation": "rotate"},
}
COMPACT, SPEEDRUN, TINY = NAMED["compact"], NAMED["speedrun"], NAMED["tiny"]
RECIPE: dict[str, Any] = Recipe().as_dict()
WRITE_UP: dict[str, Any] = {k: RECIPE[k] for k in list(RECIPE)[:8]}  # epochs ... seed
SWITCHES: dict[str, Any] = {k: RECIPE[k] for k in list(RECIPE)[8:]}


# ---------------------------------------------------------------------------------------------
# The names the rest of the project calls, with a Recipe or a dict of its keys.
# ---------------------------------------------------------------------------------------------
def check_recipe(recipe: Any) -> dict[str, Any]:
    """The recipe, completed and checked, as a checkpoint holds it; ValueError names the
    first value that is not of the type a run needs."""
    return Recipe.of(recipe).as_dict()


def full_recipe(recipe: Mapping[str, Any] | Recipe) -> dict[str, Any]:
    """Every key: the named recipe of `recipe`'s model with `recipe`'s values, not yet checked
    (Recipe.of checks them); a key the recipe does not know is a mistake, not a setting."""
    if isinstance(recipe, Recipe):
        return recipe.as_dict()
    unknown = sorted(set(recipe) - set(RULES))
    if unknown:
        raise ValueError(f"unknown recipe keys: {', '.join(unknown)} (known: {', '.join(RULES)})")
    return {**DEFAULTS, **NAMED.get(recipe.get("model", "s6"), {}), **recipe}


def net_options(recipe: Mapping[str, Any] | Recipe) -> dict[str, Any]:
    """The recipe's choices of architecture, as its model's keyword arguments."""
    recipe = Recipe.of(recipe)
    return {key: getattr(recipe, key) for key in MODEL_OPTIONS[recipe.model]}


def make_model(recipe: Mapping[str, Any] | Recipe) -> nn.Module:
    """The recipe's model, freshly built (its weights drawn from torch's generator)."""
    return MODELS[Recipe.of(recipe).model](**net_options(recipe))


def steps_per_batch(recipe: Mapping[str, Any] | Recipe) -> bool:
    return Recipe.of(recipe).per_batch


def batches_per_epoch(recipe: Mapping[str, Any] | Recipe) -> int:
    """Training batches in one epoch: every loader keeps the last, shorter batch."""
    recipe = Recipe.of(recipe)
    images = min(recipe.limit_train or TRAIN_IMAGES, TRAIN_IMAGES)
    return math.ceil(images / recipe.batch_size)


def schedule_steps(recipe: Mapping[str, Any] | Recipe) -> int:
    """How many times the scheduler is stepped over the whole run: once per batch or once per
    epoch. A finished epoch leaves the scheduler at epochs done times steps per epoch."""
    recipe = Recipe.of(recipe)
    return recipe.epochs * (batches_per_epoch(recipe) if recipe.per_batch else 1)


# OneCycle stepped per batch warms up over its first quarter (torch's default is 0.3): with a
# handful of epochs, the time at high rates is where the speedrun's accuracy comes from
# (docs/speedrun.md). The per-epoch OneCycle keeps torch's default, as its results were run.
BATCH_ONECYCLE_WARMUP = 0.25


def make_optimizer(model: nn.Module, recipe: Mapping[str, Any] | Recipe
                   ) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with momentum and a StepLR schedule, as the write-up (and the notebook, in view);
    with schedule "onecycle", a OneCycleLR to the peak `lr` instead (the compact recipe),
    stepped once per epoch like StepLR, so its total_steps is the epochs; with "onecycle-batch"
    the same stepped after every batch (the speedrun), as OneCycle's authors meant it. OneCycle
    keeps the recipe's momentum (no momentum cycling); `nesterov` makes it Nesterov's."""
    r = Recipe.of(recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum,
                                nesterov=r.nesterov)
    if r.schedule == "step":
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=r.step_size,
                                                          gamma=r.gamma)
    steps = schedule_steps(r)
    # At least two warm-up steps: torch's OneCycleLR divides by zero when its warm-up ends at
    # step 0 (a run of 4 steps in all); a full run's 3,752 steps are not affected.
    warmup = ({"pct_start": max(BATCH_ONECYCLE_WARMUP, 2 / steps) if steps >= 4 else
               BATCH_ONECYCLE_WARMUP} if r.per_batch else {})
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=r.lr, total_steps=steps, cycle_momentum=False, **warmup)
