"""The learner's toolkit for the S6 MNIST model: recipe, loaders, loops, a run, and plots.

The notebook and train.py share everything here, so both run exactly the same recipe. Read top
to bottom: the recipe, the two loaders (the original torchvision pipeline and the fast one that
reproduces its pixels on whole batches), the train/test loops, a Run that builds and fits, the
notebook's switches (smoke mode, the recipe as it prints it), and the plots. The rest lives in
a module of its own: the model in model.py, the MNIST files in mnist_files.py, the whole-batch
augmentation in augment.py, what differs from device to device (and device choice) in
devices.py, checkpoints (and the notebook's resume) in checkpoints.py, and how a figure is
drawn, saved and shown (and where a run's figures go) in figures.py.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from model import Net
from support.augment import (
    CROP_P,
    CROP_SIZE,
    MAX_ANGLE,
    augment_batch,
    augmentation_parts,
    sample_augment_params,
)
from support.devices import FastPath, compiled, fast_path, prepare, to_device
from support.figures import TARGET_ACC, finish, legible, whole_epochs
from support.fused_dropout import fuse_relu_dropout
from support.mnist_files import load_mnist_tensors

# ---------------------------------------------------------------------------------------------
# The recipe: every setting of a run, in one place. The defaults are the original S6 run's;
# every key is a train.py flag, and a checkpoint and a metrics file carry all of them.
# ---------------------------------------------------------------------------------------------
RECIPE: dict[str, Any] = {
    "epochs": 20,  # passes over the 60,000 training images
    "batch_size": 128,  # training images per SGD step
    "test_batch_size": 1000,  # test images per forward pass (evaluation only)
    "lr": 0.01,  # SGD's learning rate
    "momentum": 0.9,  # SGD's momentum
    "step_size": 15,  # StepLR: the learning rate drops after this many epochs...
    "gamma": 0.1,  # ...multiplied by this
    "seed": 1,  # fixes the weights, the shuffling, the augmentation and the dropout masks
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
MEAN, STD = 0.1307, 0.3081  # of MNIST's training pixels: inputs are normalised with these


def full_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """RECIPE with `recipe`'s values; a key RECIPE does not know is a mistake, not a setting."""
    unknown = sorted(set(recipe) - set(RECIPE))
    if unknown:
        raise ValueError(f"unknown recipe keys: {', '.join(unknown)} "
                         f"(known: {', '.join(RECIPE)})")
    return {**RECIPE, **recipe}


# ---------------------------------------------------------------------------------------------
# Loaders: the original per-sample torchvision pipeline, and a fast whole-batch one.
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
    # draws the same augmentations as an uninterrupted one.
    common = dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=leave_ctrl_c)
    gen = torch.Generator().manual_seed(seed)
    train = CtrlCSafeDataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen,
                                **common)
    test = CtrlCSafeDataLoader(test_ds, batch_size=test_batch_size, shuffle=False, **common)
    return train, test


def leave_ctrl_c(worker_id: int) -> None:
    """A DataLoader worker leaves Ctrl-C to the main process, which stops the workers: one that
    took it could die mid-batch, and its ConnectionResetError reach the user as a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class CtrlCSafeDataLoader(DataLoader):
    """A DataLoader that starts its workers under ctrl_c_held: a Ctrl-C then cannot kill a
    forked worker before its leave_ctrl_c has run, nor stop the main process with the workers
    half set up (either way torch printed a traceback as the run stopped). A spawned worker
    (macOS's default) starts a fresh interpreter, which no handler of ours reaches."""

    def __iter__(self) -> Any:
        with ctrl_c_held():
            return super().__iter__()


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Ctrl-C waits until the block ends, then arrives as usual: meanwhile SIGINT's handler
    only records it, in this process and in a worker forked meanwhile (until leave_ctrl_c).
    Only the main thread may set a handler: elsewhere, nothing is held."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):  # None: not set from Python
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        signal.raise_signal(signal.SIGINT)  # to the handler found: it raises, or ignores it


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


class DeviceLoader:
    """MNIST held as uint8 on the device; each batch is shuffled, augmented and normalised there.

    Iterating yields (images, labels) like a DataLoader. All randomness comes from
    `self.generator`, on the loader's device, so a seed fixes the whole sequence of batches.
    `augmentation` (a key of AUGMENTATIONS) switches the crop-resize or the rotation off; the
    same numbers are drawn either way, so every variant shuffles the data in the same order.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
        device: torch.device | str, train: bool, seed: int = 0,
        memory_format: torch.memory_format = torch.contiguous_format,
        augmentation: str = "both",
    ) -> None:
        self.crop, self.rotate = augmentation_parts(augmentation)
        self.device = torch.device(device)
        self.images = images.to(self.device).unsqueeze(1)  # (N, 1, 28, 28) uint8
        self.labels = labels.to(self.device)
        self.dataset = TensorDataset(self.images, self.labels)  # len(loader.dataset), as DataLoader
        self.batch_size = batch_size
        self.train = train
        self.memory_format = memory_format
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.device))
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx]
            if self.train:
                angles, crop = sample_augment_params(len(idx), self.generator, self.device)
                if self.crop or self.rotate:  # a zero angle and no crop leave an image as is
                    x = augment_batch(x, angles if self.rotate else torch.zeros_like(angles),
                                      crop if self.crop else torch.zeros_like(crop))
            x = normalize(x.float().div_(255))  # as ToTensor then Normalize
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]


def device_loader(
    data_dir: str | os.PathLike, train: bool, batch_size: int, device: torch.device | str,
    seed: int = 0, limit: int | None = None,
    memory_format: torch.memory_format = torch.contiguous_format, augmentation: str = "both",
) -> DeviceLoader:
    images, labels = load_mnist_tensors(data_dir, train=train)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return DeviceLoader(images, labels, batch_size, device, train=train, seed=seed,
                        memory_format=memory_format, augmentation=augmentation)


def make_loaders(recipe: dict[str, Any], data_dir: str | os.PathLike, device: torch.device,
                 settings: FastPath | None = None) -> tuple[Any, Any]:
    """The recipe's train and test loaders: `fast` (tensors on the device, laid out as the
    fast path's model wants them) or `torchvision` (the original per-sample pipeline)."""
    r = recipe
    if r["loader"] == "fast":
        layout = (settings or fast_path(r, device)).memory_format
        return (device_loader(data_dir, True, r["batch_size"], device, r["seed"],
                              r["limit_train"], layout, r["augmentation"]),
                device_loader(data_dir, False, r["test_batch_size"], device,
                              limit=r["limit_test"], memory_format=layout))
    if r["loader"] == "torchvision":
        return torchvision_loaders(data_dir, r["batch_size"], r["test_batch_size"], r["seed"],
                                   r["limit_train"], r["limit_test"],
                                   pin_memory=device.type == "cuda",
                                   augmentation=r["augmentation"])
    raise ValueError(f"unknown loader {r['loader']!r}: use 'fast' or 'torchvision'")


# ---------------------------------------------------------------------------------------------
# The loops: one training epoch, one evaluation, and fit, which strings epochs together.
# ---------------------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    """Training diverged; `batch` is None when it showed only after the epoch's last step."""

    def __init__(self, epoch: int, batch: int | None) -> None:
        where = f"batch {batch}" if batch is not None else "its last batch (test loss)"
        super().__init__(f"loss became NaN or infinite at epoch {epoch}, {where}")
        self.epoch, self.batch = epoch, batch


def new_history() -> dict[str, list[float]]:
    """One list per column, one value per finished epoch (a checkpoint holds it as is)."""
    keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
    return {k: [] for k in keys}


Progress = bool | IO[str]  # False: no bars; True: on stderr; a stream: on that stream


def progress_bar(loader: Any, desc: str, progress: Progress) -> tqdm:
    """A bar that clears itself when its pass ends (or is interrupted), so a terminal or a saved
    notebook keeps only the epoch lines. True draws it on stderr, a terminal's convention (stdout
    stays the log); a notebook passes sys.stdout, since Jupyter shows stderr as pink blocks."""
    stream = None if isinstance(progress, bool) else progress
    return tqdm(loader, desc=desc, leave=False, disable=not progress, file=stream,
                mininterval=1.0)


def train_epoch(
    model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, device: torch.device,
    epoch: int = 1, progress: Progress = True, refresh_every: int = 25,
) -> tuple[float, float]:
    """One pass over `loader`; returns (mean loss, accuracy %) of the training batches.

    Sums stay on the device and are read only every `refresh_every` batches, so a GPU is not
    stalled by a sync per step. A non-finite loss is spotted at the next read and reported
    with the batch where it first appeared.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    # `with`: an interrupt clears the bar too, before the notebook says what is saved
    with progress_bar(loader, f"epoch {epoch:>2} train", progress) as bar:
        for i, (x, y) in enumerate(bar, start=1):
            x, y = to_device(x, device), to_device(y, device)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = F.nll_loss(out, y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss = loss.detach()
                # `i` goes in as a Python scalar, not a new device tensor: no host-to-device copy
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
                loss_sum += loss * len(y)
                correct += (out.argmax(1) == y).sum()
            seen += len(y)
            if i % refresh_every == 0 or i == len(loader):
                if first_bad.item() >= 0:
                    raise NonFiniteLoss(epoch, int(first_bad.item()))
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                acc=f"{100 * correct.item() / seen:.2f}%")
    if first_bad.item() >= 0:
        raise NonFiniteLoss(epoch, int(first_bad.item()))
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: Any, device: torch.device, progress: Progress = False,
    epoch: int = 0,
) -> tuple[float, float]:
    """(mean loss, accuracy %) over the whole loader, in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    with progress_bar(loader, f"epoch {epoch:>2} test ", progress) as bar:
        for x, y in bar:
            x, y = to_device(x, device), to_device(y, device)
            out = model(x)
            loss_sum += F.nll_loss(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            n += len(y)
    return loss_sum.item() / n, 100.0 * correct.item() / n


def fit(
    model: nn.Module, train_loader: Any, test_loader: Any, optimizer: torch.optim.Optimizer,
    scheduler: Any, device: torch.device, epochs: int,
    history: dict[str, list[float]] | None = None,
    on_epoch_end: Callable[[dict[str, list[float]]], None] | None = None,
    progress: Progress = True, log: bool = True, eval_model: nn.Module | None = None,
) -> dict[str, list[float]]:
    """Train until `epochs` epochs are in `history` (so a resumed run continues where it was).

    `progress` shows tqdm bars (see progress_bar); `log` prints one summary line per epoch,
    which stays when the bars clear. `eval_model` (default:
    `model`) scores each epoch: a run trained through torch.compile evaluates its plain module.
    """
    history = history if history is not None else new_history()
    eval_model = eval_model if eval_model is not None else model
    for epoch in range(len(history["epoch"]) + 1, epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, device, epoch, progress)
        test_loss, test_acc = evaluate(eval_model, test_loader, device, progress, epoch)
        if not math.isfinite(test_loss) or not _all_finite(model):
            raise NonFiniteLoss(epoch, None)  # a last step that diverged is never saved
        scheduler.step()
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                   test_acc=test_acc, lr=lr, seconds=time.perf_counter() - start)
        for k, v in row.items():
            history[k].append(v)
        if log:
            tqdm.write(f"epoch {epoch:>2}: train loss {train_loss:.4f} acc {train_acc:.2f}% | "
                       f"test loss {test_loss:.4f} acc {test_acc:.2f}% | lr {lr:g} | "
                       f"{row['seconds']:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(history)
    return history


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


# ---------------------------------------------------------------------------------------------
# One run: model, optimiser, loaders and history, built from a recipe. checkpoints.py saves
# and restores it.
# ---------------------------------------------------------------------------------------------
def net_options(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's choices of architecture, as Net's keyword arguments."""
    return {key: recipe[key] for key in ("dropout_plan", "batch_norm", "transitions", "head",
                                         "width")}


def build_model(recipe: dict[str, Any], device: torch.device,
                settings: FastPath | None = None) -> Net:
    """The recipe's network, on the device, in the form its loader trains it."""
    settings = settings or fast_path(recipe, device)
    model = Net(**net_options(recipe))
    if settings.fused_dropout:
        fuse_relu_dropout(model)  # the same function and weights, cheaper on the CPU
    return model.to(device, memory_format=settings.memory_format)


def make_optimizer(model: nn.Module,
                   recipe: dict[str, Any]) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with momentum and a StepLR schedule, as the original."""
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"],
                                momentum=recipe["momentum"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe["step_size"],
                                                gamma=recipe["gamma"])
    return optimizer, scheduler


class Run:
    """Everything a training run needs, built from a recipe (see RECIPE) in a fixed order.

    `compile` trains through torch.compile; `self.model` stays the plain module, so
    checkpoints hold the same keys either way.
    """

    def __init__(self, recipe: dict[str, Any], device: torch.device,
                 data_dir: str | os.PathLike = "data") -> None:
        self.recipe = r = full_recipe(recipe)
        self.device = device
        settings = prepare(r, device)  # the fast path's one decision, applied below
        torch.manual_seed(r["seed"])  # also seeds CUDA and MPS
        self.model = build_model(r, device, settings)
        self.optimizer, self.scheduler = make_optimizer(self.model, r)
        self.train_loader, self.test_loader = make_loaders(r, data_dir, device, settings)
        self.history = new_history()
        self.trained = compiled(self.model, device) if r["compile"] else self.model

    def fit(self, on_epoch_end: Callable[[dict[str, list[float]]], None] | None = None,
            progress: Progress = True, log: bool = True) -> dict[str, list[float]]:
        """Train until the recipe's epochs are in the history (a restored run continues)."""
        return fit(self.trained, self.train_loader, self.test_loader, self.optimizer,
                   self.scheduler, self.device, epochs=self.recipe["epochs"],
                   history=self.history, on_epoch_end=on_epoch_end, progress=progress,
                   log=log, eval_model=self.model)


# ---------------------------------------------------------------------------------------------
# The notebook's switches: smoke mode, and the recipe as it prints it.
# ---------------------------------------------------------------------------------------------
SMOKE_VALUES = {None: False, "": False, "0": False, "1": True}  # S6_SMOKE: unset/""/0 or 1


def smoke_mode(value: str | None) -> bool:
    """S6_SMOKE's one rule: unset, empty or "0" is the full run, "1" the smoke run; anything
    else is refused, so that a "true" or a " 1" never starts a 20-epoch run that replaces the
    committed figures."""
    if value not in SMOKE_VALUES:
        raise ValueError(f"S6_SMOKE={value!r} is not a setting: use S6_SMOKE=1 for the smoke run "
                         f"(1 epoch on 2,048 images), or 0 (or leave it unset) for the full run")
    return SMOKE_VALUES[value]


def format_recipe(recipe: dict[str, Any]) -> str:
    """One key per line, values aligned: a printed dict wraps mid-word on GitHub."""
    width = max(map(len, recipe))
    return "\n".join(f"  {key:<{width}}  {value}" for key, value in recipe.items())


# ---------------------------------------------------------------------------------------------
# Pictures: training curves, sample grids, and what the model gets wrong.
# Each helper draws with pyplot (so a notebook shows it inline), saves it when given a path,
# and returns the figure.
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


@legible
def image_grid(images: torch.Tensor, titles: list[str], cols: int = 8,
               path: str | os.PathLike | None = None, suptitle: str | None = None) -> Any:
    """A grid of (N, 1, 28, 28) or (N, 28, 28) images with a caption under each."""
    import matplotlib.pyplot as plt

    images = images.detach().float().cpu().reshape(len(images), 28, 28)
    rows = max(1, math.ceil(len(images) / cols))  # an empty grid still gets its title
    # Constrained layout: tight_layout leaves a two-line caption overlapping the digit above.
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.7 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        # Nearest: the digit's own 28 x 28 pixels, crisp at any size, never smoothed.
        ax.imshow(img.numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=10.5)
    if suptitle:
        fig.suptitle(suptitle)
    return finish(fig, path)


def augmented_samples(loader: Any, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of one training batch, as the model sees them (de-normalised)."""
    x, y = next(iter(loader))
    return (x[:n] * STD + MEAN).clamp(0, 1), y[:n]


@torch.inference_mode()
def predict(model: nn.Module, loader: Any, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images de-normalised, labels, predictions, confidence) over a loader, on the CPU."""
    model.eval()
    xs, ys, preds, confs = [], [], [], []
    for x, y in loader:
        probs = model(x.to(device)).exp()
        conf, pred = probs.max(1)
        xs.append((x.cpu() * STD + MEAN).clamp(0, 1))
        ys.append(y.cpu())
        preds.append(pred.cpu())
        confs.append(conf.cpu())
    return torch.cat(xs), torch.cat(ys), torch.cat(preds), torch.cat(confs)


def plot_misclassified(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                       conf: torch.Tensor, n: int = 24,
                       path: str | os.PathLike | None = None) -> Any:
    """The n misclassified test digits the model was most sure about.

    Three rows of eight by default: about half of a good run's mistakes, and light enough
    for the committed notebook (it must stay under 300 KB).
    """
    wrong = (preds != labels).nonzero().flatten()
    total = len(wrong)
    wrong = wrong[conf[wrong].argsort(descending=True)][:n]
    titles = [f"true {labels[i]}, pred {preds[i]}\n{100 * conf[i]:.0f}% sure"
              for i in wrong.tolist()]
    shown = (f"the {len(wrong)} the model was surest of" if len(wrong) < total
             else "all shown" if total else "none to show")
    return image_grid(images[wrong], titles, path=path,
                      suptitle=f"{total:,} of {len(labels):,} test digits misclassified; "
                               f"{shown}{', most confident first' if len(wrong) > 1 else ''}")


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor,
                     num_classes: int = 10) -> torch.Tensor:
    """Counts[true, predicted]."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> list[float]:
    """Accuracy (%) of each true class, from a confusion matrix."""
    return (100.0 * cm.diag() / cm.sum(1).clamp(min=1)).tolist()


@legible
def plot_confusion_matrix(cm: torch.Tensor, path: str | os.PathLike | None = None) -> Any:
    """Counts with the diagonal uncoloured, so the few mistakes stand out; per-class accuracy in
    the row labels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    off = cm.clone().float()
    off.fill_diagonal_(0)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(off.numpy(), cmap="Reds", vmin=0)
    acc = per_class_accuracy(cm)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true (class accuracy)",
           title="Confusion matrix (colour: mistakes only)")
    ax.set_yticklabels([f"{i} ({a:.1f}%)" for i, a in enumerate(acc)])
    for t in range(10):
        for p in range(10):
            if int(cm[t, p]):
                _count(ax, im, t, p, int(cm[t, p]))
    # The colour bar in an axes of its own beside the matrix: with `fig.colorbar(ax=ax)` the
    # layout pushed the y-label off the figure's left edge. Counts are whole: integer ticks.
    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.15)
    fig.colorbar(im, cax=cax, ticks=MaxNLocator(integer=True), format="%d", label="mistakes")
    return finish(fig, path)


def _count(ax: Any, im: Any, true: int, pred: int, value: int) -> None:
    """A cell's count: white on a dark cell, black on a light one; mistakes in bold."""
    r, g, b, _ = im.cmap(im.norm(0.0 if true == pred else float(value)))
    dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5  # relative luminance
    ax.text(pred, true, value, ha="center", va="center",
            fontsize=10.5 if true == pred else 12,
            fontweight="normal" if true == pred else "bold",
            color="white" if dark else "#303030" if true == pred else "black")


def save_analysis(model: nn.Module, test_loader: Any, device: torch.device,
                  save_dir: str | os.PathLike | None = "images") -> dict[str, Any]:
    """Misclassified grid, confusion matrix and per-class accuracy of a trained model."""
    images, labels, preds, conf = predict(model, test_loader, device)
    cm = confusion_matrix(labels, preds)
    out = Path(save_dir) if save_dir else None
    figs = {
        "misclassified": plot_misclassified(images, labels, preds, conf,
                                            path=out / "misclassified.png" if out else None),
        "confusion": plot_confusion_matrix(cm, path=out / "confusion_matrix.png" if out else None),
    }
    return {"confusion_matrix": cm, "per_class_accuracy": per_class_accuracy(cm), "figures": figs}
