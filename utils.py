"""The lesson's toolkit: what Session_6_Solution.ipynb and train.py use to train model.Net.

Read top to bottom, in the order the notebook meets it: the recipe, the loaders, `train` and
`test` (named as in pytorch/examples' mnist/main.py), what the epoch loop needs to save and
resume, and the plots. What makes the run trustworthy and fast (checked checkpoints, the fast
path, the pixel-exact augmentation, figure conventions, the MNIST files) lives in support/,
one module per concern; the few of its names the notebook needs are offered here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from support import checkpoints
from support.analysis import augmented_samples, image_grid, save_analysis  # noqa: F401 (offered to the notebook)
from support.augment import CROP_P, CROP_SIZE, MAX_ANGLE, augmentation_parts
from support.bookkeeping import (  # noqa: F401 (offered to the notebook)
    STDOUT,
    NonFiniteLoss,
    Progress,
    Tally,
    final_line,
    new_history,
    progress_bar,
    record_epoch,
    start_epoch,
)
from support.devices import (  # noqa: F401 (offered to the notebook)
    compiled,
    describe_device,
    fast_path,
    get_device,
    prepare_model,
    to_device,
)
from support.fast_loader import device_loader
from support.figures import TARGET_ACC, figures_dir, finish, legible, save_figure, show  # noqa: F401 (offered to the notebook)
from support.mnist_files import ensure_mnist  # noqa: F401 (offered to the notebook)
from support.recipe import (  # noqa: F401 (offered to the notebook)
    MEAN,
    MODELS,
    RECIPE,
    STD,
    format_recipe,
    full_recipe,
    make_model,
    make_optimizer,
    net_options,
    smoke_mode,
    steps_per_batch,
)
from support.workers import CtrlCSafeDataLoader, leave_ctrl_c

# ---------------------------------------------------------------------------------------------
# The recipe (support/recipe.py): the write-up's settings (SGD lr 0.01, momentum 0.9, StepLR
# 15/0.1, 20 epochs of batch 128, seed 1), then this project's switches, whose defaults are the
# write-up's choices. Every key is a train.py flag; a checkpoint and a metrics file carry all.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Loaders: the original per-sample torchvision pipeline, and the fast whole-batch one.
# ---------------------------------------------------------------------------------------------
def train_transforms(augmentation: str = "both") -> Any:
    """The original S6 train pipeline, one PIL image at a time; `augmentation` (a key of
    AUGMENTATIONS) leaves out the crop-resize or the rotation for the ablation."""
    from torchvision import transforms as T

    crop, rotate = augmentation_parts(augmentation)
    steps: list[Any] = []
    if crop:
        steps += [T.RandomApply([T.CenterCrop(CROP_SIZE)], p=CROP_P), T.Resize((28, 28))]
    if rotate:
        steps.append(T.RandomRotation((-MAX_ANGLE, MAX_ANGLE), fill=0))
    return T.Compose([*steps, T.ToTensor(), T.Normalize((MEAN,), (STD,))])


def test_transforms() -> Any:
    """The original's test pipeline: no augmentation."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize((MEAN,), (STD,))])


def torchvision_loaders(
    data_dir: str | os.PathLike,
    batch_size: int,
    test_batch_size: int,
    seed: int,
    limit_train: int | None = None,
    limit_test: int | None = None,
    num_workers: int | None = None,
    pin_memory: bool = False,
    augmentation: str = "both",
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """DataLoaders over torchvision's MNIST; `loader.generator` holds the shuffling state."""
    from torch.utils.data import Subset
    from torchvision.datasets import MNIST

    train_ds = MNIST(str(data_dir), train=True, download=False,
                     transform=train_transforms(augmentation))
    test_ds = MNIST(str(data_dir), train=False, download=False, transform=test_transforms())
    if limit_train:
        train_ds = Subset(train_ds, range(min(limit_train, len(train_ds))))
    if limit_test:
        test_ds = Subset(test_ds, range(min(limit_test, len(test_ds))))
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    # Workers are not persistent: each epoch re-seeds them from `generator`, so a resumed run
    # draws the same augmentations as an uninterrupted one. They leave Ctrl-C to this process.
    common = dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=leave_ctrl_c)
    gen = torch.Generator().manual_seed(seed)
    train = CtrlCSafeDataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen,
                                **common)
    test = CtrlCSafeDataLoader(test_ds, batch_size=test_batch_size, shuffle=False, **common)
    return train, test


def make_loaders(recipe: dict[str, Any], data_dir: str | os.PathLike,
                 device: torch.device) -> tuple[Any, Any]:
    """The recipe's train and test loaders: `fast` (support/fast_loader.py: tensors on the
    device, laid out as the fast path's model wants them) or `torchvision` (the original's)."""
    r = full_recipe(recipe)
    if r["loader"] == "fast":
        layout = fast_path(r, device).memory_format
        return (device_loader(data_dir, True, r["batch_size"], device, r["seed"],
                              r["limit_train"], layout, r["augmentation"]),
                device_loader(data_dir, False, r["test_batch_size"], device,
                              limit=r["limit_test"], memory_format=layout))
    return torchvision_loaders(data_dir, r["batch_size"], r["test_batch_size"], r["seed"],
                               r["limit_train"], r["limit_test"],
                               pin_memory=device.type == "cuda", augmentation=r["augmentation"])


# ---------------------------------------------------------------------------------------------
# Train and test: one epoch of SGD, one pass over the test set. A Tally (support/bookkeeping)
# keeps the sums on the device and stops a run whose loss became NaN.
# ---------------------------------------------------------------------------------------------
def train(model: nn.Module, device: torch.device, train_loader: Any,
          optimizer: torch.optim.Optimizer, epoch: int,
          progress: Progress = STDOUT, scheduler: Any = None) -> tuple[float, float]:
    """One epoch; returns its (mean training loss, training accuracy %). `progress`: where the
    bar goes (support.bookkeeping.Progress: stdout by default, as a notebook wants it). A
    `scheduler` given is stepped after every optimizer step (a per-batch OneCycle)."""
    model.train()
    with progress_bar(train_loader, f"epoch {epoch:>2} train", progress) as bar:
        tally = Tally(device, bar, epoch)
        for data, target in bar:
            data, target = to_device(data, device), to_device(target, device)
            optimizer.zero_grad(set_to_none=True)
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            tally.add(loss, output, target)
    return tally.result()


@torch.inference_mode()
def test(model: nn.Module, device: torch.device, test_loader: Any, epoch: int = 0,
         progress: Progress = STDOUT) -> tuple[float, float]:
    """(mean test loss, test accuracy %) over the whole loader, in eval mode."""
    model.eval()
    with progress_bar(test_loader, f"epoch {epoch:>2} test ", progress) as bar:
        tally = Tally(device, bar)
        for data, target in bar:
            data, target = to_device(data, device), to_device(target, device)
            output = model(data)
            tally.add(F.nll_loss(output, target, reduction="sum"), output, target, summed=True)
    return tally.result()


# ---------------------------------------------------------------------------------------------
# A run, and what the epoch loop needs to save and resume it.
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a checkpoint holds (support/checkpoints.py): the recipe, the model, SGD, StepLR,
    the train loader's random state and the history. `trained` is the module the loop trains:
    the model, or its torch.compile wrapper (checkpoints keep the plain module's keys)."""

    recipe: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    test_loader: Any
    history: dict[str, list[float]] = field(default_factory=new_history)
    trained: nn.Module | None = None
    device: torch.device | None = None  # where the model is (default: where its weights are)
    saved: int = 0  # epochs of this run that its checkpoint holds
    lr: float = 0.0  # the learning rate of the epoch in progress (support.bookkeeping)
    clock: float = 0.0  # when that epoch started

    def __post_init__(self) -> None:
        self.recipe = full_recipe(self.recipe)
        built = MODELS[self.recipe["model"]]
        if type(self.model) is not built:  # e.g. the notebook's Net for a compact recipe
            raise ValueError(f"the recipe's model is {self.recipe['model']!r}, a "
                             f"{built.__name__}, not the {type(self.model).__name__} given: "
                             f"build the model from the same recipe (the compact model trains "
                             f"with python train.py --model compact)")
        if self.trained is None:  # not `or`: a compiled module refuses bool()
            self.trained = self.model
        if self.device is None:
            self.device = next(self.model.parameters()).device


def build_run(recipe: dict[str, Any], device: torch.device,
              data_dir: str | os.PathLike = "data") -> Run:
    """The notebook's training cell up to its loop, as one call (train.py, the benchmarks and
    the tests build their runs with it)."""
    recipe = full_recipe(recipe)
    torch.manual_seed(recipe["seed"])  # also seeds CUDA and MPS
    model = prepare_model(make_model(recipe), recipe, device)
    optimizer, scheduler = make_optimizer(model, recipe)
    train_loader, test_loader = make_loaders(recipe, data_dir, device)
    trained = compiled(model, device) if recipe["compile"] else model
    return Run(recipe, model, optimizer, scheduler, train_loader, test_loader, trained=trained)


def fit(run: Run, on_epoch_end: Callable[[dict[str, list[float]]], None] | None = None,
        progress: Progress = STDOUT, log: bool = True) -> dict[str, list[float]]:
    """The notebook's epoch loop as one call: train until the recipe's epochs are in the
    history (a restored run continues), calling `on_epoch_end` after each."""
    per_batch = steps_per_batch(run.recipe)  # then train() steps it, not this loop
    start_epoch(run)
    for epoch in range(len(run.history["epoch"]) + 1, run.recipe["epochs"] + 1):
        train_loss, train_acc = train(run.trained, run.device, run.train_loader, run.optimizer,
                                      epoch, progress, run.scheduler if per_batch else None)
        test_loss, test_acc = test(run.model, run.device, run.test_loader, epoch, progress)
        if not per_batch:
            run.scheduler.step()
        record_epoch(run, train_loss, train_acc, test_loss, test_acc, log)
        if on_epoch_end is not None:
            on_epoch_end(run.history)
        start_epoch(run)
    return run.history


@contextmanager
def resume_or_start(run: Run, path: str | os.PathLike, retrain: bool = False) -> Iterator[int]:
    """Yield the epoch the loop starts at, and say so: after the epochs saved in `path` if it
    holds a run of this recipe (a finished one is loaded, not trained again), else 1. Another
    recipe's run is refused, saying what differs, unless `retrain`. Interrupted inside, it says
    which epoch is saved, then lets the interrupt through, so that "Run all" stops there."""
    if run.recipe["compile"] and run.trained is run.model:
        raise ValueError("this loop trains the model as it is: recipe['compile'] is train.py's "
                         "switch (python train.py --compile), or train run.trained")
    checkpoints.resume(run, path, retrain)
    run.saved = len(run.history["epoch"])
    start_epoch(run)
    try:
        yield run.saved + 1
    except KeyboardInterrupt:
        if run.saved:
            print(f"interrupted: epoch {run.saved} of {run.recipe['epochs']} is saved in {path}; "
                  f"run this cell again to go on from there")
        else:
            print("interrupted before the first epoch was saved: running this cell again "
                  "starts the run over")
        raise


def save_epoch(run: Run, path: str | os.PathLike, train_loss: float, train_acc: float,
               test_loss: float, test_acc: float) -> None:
    """Add the finished epoch to the history, print its line, and save the run in `path`
    (an atomic write: a crash leaves the previous checkpoint whole)."""
    record_epoch(run, train_loss, train_acc, test_loss, test_acc)
    checkpoints.save_run(run, path)
    run.saved = len(run.history["epoch"])
    start_epoch(run)


# ---------------------------------------------------------------------------------------------
# Plots: the write-up's two figures, loss and accuracy per epoch. The pictures of the data and
# of the mistakes (image_grid, save_analysis) are support/analysis.py's.
# ---------------------------------------------------------------------------------------------
ZOOM_FROM = 98.5  # the accuracy plot's second panel starts here, so the last 0.1% shows


@legible
def plot_history(history: dict[str, list[float]],
                 save_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """The original's two figures: train/test loss, and train/test accuracy, per epoch.

    The accuracy figure has a second panel from 98.5% up, where the test curve meets the
    dashed 99.4% target: on the full scale the last tenths of a percent are a flat line.
    """
    import matplotlib.pyplot as plt

    from support.figures import whole_epochs

    figs = []
    for key, label, name in (("loss", "loss (NLL)", "loss.png"),
                             ("acc", "accuracy (%)", "accuracy.png")):
        panels = 2 if key == "acc" else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
        ax = axes[0, 0]
        ax.plot(history["epoch"], history[f"train_{key}"], "o-", label="train")
        ax.plot(history["epoch"], history[f"test_{key}"], "s-", label="test")
        ax.set(xlabel="epoch", ylabel=label, title=f"{label.split(' ')[0].title()} per epoch")
        if key == "acc":
            ax.axhline(TARGET_ACC, color="tab:red", linestyle="--", linewidth=1,
                       label=f"target {TARGET_ACC}%")
            _zoomed_accuracy(axes[0, 1], history)
        for a in axes.flat:
            whole_epochs(a)
            a.grid(alpha=0.3)
        ax.legend()
        figs.append(finish(fig, Path(save_dir) / name if save_dir else None))
    return figs[0], figs[1]


def _zoomed_accuracy(ax: Any, history: dict[str, list[float]]) -> None:
    """Accuracy from ZOOM_FROM up, with the target line and the final test accuracy."""
    train = ax.plot(history["epoch"], history["train_acc"], "o-", alpha=0.5, label="train")[0]
    test = ax.plot(history["epoch"], history["test_acc"], "s-", label="test")[0]
    ax.axhline(TARGET_ACC, color="tab:red", linestyle="--", linewidth=1,
               label=f"target {TARGET_ACC}%")
    top = max([TARGET_ACC, *history["test_acc"], *history["train_acc"]])
    # Room above the highest point for the final accuracy's note: a third of the span.
    ax.set_ylim(ZOOM_FROM, top + max(0.15, 0.3 * (top - ZOOM_FROM)))
    for line, name in ((train, "train"), (test, "test")):
        _mark_below_floor(ax, line, name)
    if history["epoch"]:
        last, acc = history["epoch"][-1], history["test_acc"][-1]
        ax.annotate(f"{acc:.2f}%", (last, acc), textcoords="offset points", xytext=(0, 9),
                    ha="center", va="bottom", fontsize=12, fontweight="bold",
                    color=test.get_color())
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"Accuracy from {ZOOM_FROM}% up")
    ax.legend(loc="best")  # up to five entries: where they cover the fewest points


def _mark_below_floor(ax: Any, line: Any, name: str) -> None:
    """A curve's epochs under the panel's floor, as ▼ on its bottom edge, named in the legend."""
    below = [e for e, a in zip(line.get_xdata(), line.get_ydata(), strict=True) if a < ZOOM_FROM]
    if not below:
        return
    # x in epochs, y in the panel's height: just above the bottom edge, whatever the limits.
    edge = ax.get_xaxis_transform()
    epochs = f"epoch{'s' if len(below) > 1 else ''} {epoch_ranges(below)}"
    ax.plot(below, [0.03] * len(below), "v", transform=edge, color=line.get_color(),
            markersize=8, clip_on=False, label=f"{name} below {ZOOM_FROM}%: {epochs}")


def epoch_ranges(epochs: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7': consecutive epochs as one range."""
    runs: list[list[int]] = []
    for e in sorted(int(e) for e in epochs):
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def read_ablation(results: str | os.PathLike = "results/ablation",
                  save_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The ablation's table and how-many-parameters table (Markdown, the latter with the
    compact model's runs) and their two figures, from the result files the benchmarks wrote
    (None when there are none yet); the figures are saved in `save_dir` when given."""
    from benchmarks import ablation

    found = ablation.load_results(results)
    if not any(found.values()):
        return None
    compact = ablation.compact_runs(Path(results).parent / "compact")
    out = Path(save_dir) if save_dir else None
    return {"table": ablation.format_table(ablation.summarise(found)),
            "parameters_table": ablation.parameters_table(found, compact),
            "accuracy": ablation.plot_ablation(found, path=out / "ablation.png" if out else None),
            "parameters": ablation.plot_parameters(
                found, out / "parameters.png" if out else None, compact)}
