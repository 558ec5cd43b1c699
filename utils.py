"""The lesson's toolkit: what Session_6_Solution.ipynb and train.py use to train model.Net.

Read top to bottom, in the order the notebook meets them:
  1. the loaders, and the augmentation they apply, in the write-up's order;
  2. `train` and `test`, named and written as in pytorch/examples' mnist/main.py;
  3. `save_checkpoint` and `load_checkpoint`: one dict with readable keys, each way;
  4. the plots, `plot_history` and `plot_mistakes`, drawn in support/figures.py.
The recipe, `RECIPE`, is support/recipe.py's. What makes these trustworthy and fast (every
checkpoint checked, one process per checkpoint, the fast path, Pillow's exact pixels, the MNIST
files) is in support/, one module per concern; each name below says where it comes from.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from support import checkpoints, outputs
from support.augment import augmentation_parts, crop_resize, rotate_nearest, sample_augment_params
from support.bookkeeping import (
    STDOUT,
    Progress,
    Tally,
    check_epoch_row,
    check_finite,
    epoch_line,
    history_columns,
    history_rows,
    progress_bar,
)
from support.checkpoint_checks import check_objects
from support.devices import fast_path, prepare_model, to_device  # noqa: F401 (prepare_model: the notebook's)
from support.fast_loader import DeviceLoader
from support.figures import plot_history, plot_mistakes  # noqa: F401 (the notebook's plots)
from support.mnist_files import ensure_mnist, load_mnist_tensors
from support.recipe import RECIPE, full_recipe  # noqa: F401 (RECIPE: train.py's and the tests')
from support.torchvision_loader import torchvision_loaders


# ---------------------------------------------------------------------------------------------
# 1. The loaders: MNIST on the device, each training batch augmented there as below.
# ---------------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator,
            parts: str = "both") -> torch.Tensor:
    """The write-up's training augmentation of a batch of uint8 images (N, 1, 28, 28), in its
    order, with the pixels torchvision's per-image pipeline gives for the same draws
    (support/augment.py does Pillow's arithmetic on the whole batch). `parts` leaves out the
    crop-resize or the rotation (the ablation); the draws are the same either way."""
    crop, rotate = augmentation_parts(parts)
    angles, cropped = sample_augment_params(len(images), generator, images.device)
    if crop:  # 1. RandomApply([CenterCrop(22)], p=0.1), then Resize((28, 28)), bilinear
        images = crop_resize(images, cropped)
    if rotate:  # 2. RandomRotation(±15°): nearest neighbour, the corners filled with 0
        images = rotate_nearest(images, angles)
    return images  # 3. the loader then scales to [0, 1] and normalises: ToTensor, Normalize


def get_loaders(recipe: dict[str, Any], data_dir: str | os.PathLike,
                device: torch.device) -> tuple[Any, Any]:
    """The recipe's training and test loaders, fetching MNIST into `data_dir` the first time
    (each file checked against its published MD5). `fast` (the default): the images held on
    the device, shuffled and augmented there a batch at a time, laid out as the fast path's
    model wants them. `torchvision`: the original's per-image pipeline, the same pixels."""
    recipe = full_recipe(recipe)
    augmentation_parts(recipe["augmentation"])  # an unknown name is refused now, not mid-epoch
    data_dir = outputs.user_path(data_dir)  # "~/d" verified and read at home, not in ./~
    ensure_mnist(data_dir)
    if recipe["loader"] == "torchvision":
        return torchvision_loaders(recipe, data_dir, device)
    layout = fast_path(recipe, device).memory_format  # channels-last on the CPU
    loaders = []
    for train in (True, False):
        images, labels = load_mnist_tensors(data_dir, train=train)
        limit = recipe["limit_train" if train else "limit_test"] or len(labels)
        loaders.append(DeviceLoader(
            images[:limit], labels[:limit], recipe["batch_size" if train else "test_batch_size"],
            device, train, seed=recipe["seed"], memory_format=layout,
            augment=functools.partial(augment, parts=recipe["augmentation"]) if train else None))
    return loaders[0], loaders[1]


# ---------------------------------------------------------------------------------------------
# 2. Train and test: one epoch of SGD, one pass over the test set. A Tally (support/bookkeeping)
# keeps the sums on the device and stops a run whose loss became NaN.
# ---------------------------------------------------------------------------------------------
def train(model: nn.Module, device: torch.device, train_loader: Any,
          optimizer: torch.optim.Optimizer, epoch: int, progress: Progress = STDOUT,
          scheduler: Any = None) -> tuple[float, float]:
    """One epoch; returns its (mean training loss, training accuracy %). `progress`: where the
    bar goes (stdout, as a notebook wants it; False for none). A `scheduler` given here is
    stepped after every batch (a per-batch schedule); the write-up's StepLR is stepped once per
    epoch by the loop instead."""
    model.train()
    with (progress_bar(train_loader, f"epoch {epoch:>2} train", progress) as bar,
          checkpoints.stop_says_what_is_saved()):  # the stop button: which epoch is saved
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
    with (progress_bar(test_loader, f"epoch {epoch:>2} test ", progress) as bar,
          checkpoints.stop_says_what_is_saved()):
        tally = Tally(device, bar)
        for data, target in bar:
            data, target = to_device(data, device), to_device(target, device)
            output = model(data)
            tally.add(F.nll_loss(output, target, reduction="sum"), output, target, summed=True)
    return tally.result()


# ---------------------------------------------------------------------------------------------
# 3. Saving and resuming: what a run needs to go on exactly as if it had not stopped.
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, train_loader: Any,
                    recipe: dict[str, Any], history: list[dict[str, float]],
                    log: bool = True) -> None:
    """Save the run after the last epoch in `history` (a row per epoch) and print its line.
    The run must be finite, and the model, optimizer and scheduler the recipe's, trained at the
    rates its schedule sets (ValueError says what differs): nothing is saved that says another
    run than the one that trained. The file is written whole or not at all (a crash leaves the
    previous one), by one process at a time."""
    recipe, path = full_recipe(recipe), outputs.user_path(path)  # "~/s6.pt" is at home
    for epoch, row in enumerate(history, start=1):
        check_epoch_row(row, epoch)
    plain = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: save the model's keys
    if history:
        check_finite(plain, history[-1])
    check_objects(model, optimizer, scheduler, recipe, history)
    checkpoint = {
        "model": plain.state_dict(),  # the weights and BatchNorm's running statistics
        "optimizer": optimizer.state_dict(),  # SGD's momentum buffers
        "scheduler": scheduler.state_dict(),  # where the schedule is
        "history": history_columns(history),  # a column per key, a value per epoch
        "recipe": recipe,  # every setting, so that a resume repeats them
        "rng": checkpoints.rng_states(train_loader, next(plain.parameters()).device),
    }
    checkpoints.hold(path)
    checkpoints.write_checkpoint(checkpoint, path)
    checkpoints.saved_after(path, len(history))
    if log and history:
        print(epoch_line(history[-1]))


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, train_loader: Any,
                    recipe: dict[str, Any], retrain: bool = False,
                    may_change: tuple[str, ...] = (), notebook: bool = True
                    ) -> list[dict[str, float]]:
    """The history saved in `path`, one row per finished epoch, with the model, optimizer,
    scheduler and the loader's random draws put back as they were after its last epoch; []
    for a new run. Says which in one line. The objects must be the recipe's, and the saved run
    of the same recipe (ValueError says what differs), unless `retrain`, which starts over in
    its place. `may_change`: the recipe keys train.py's resume may change (--epochs, --lr).
    `notebook`: this process holds `path` until it exits, and a stop says which epoch it
    holds; train.py (False) holds its --save-model itself and says what a stop leaves."""
    recipe, path = full_recipe(recipe), outputs.user_path(path)  # "~/s6.pt" is at home
    check_objects(model, optimizer, scheduler, recipe, [])
    if notebook:
        checkpoints.hold(path)  # another kernel is refused this file from now on
    checkpoint = checkpoints.resumable(path, recipe, retrain, may_change)
    history = history_rows(checkpoint["history"]) if checkpoint else []
    if notebook:
        checkpoints.watch(path, len(history), recipe["epochs"])
    if checkpoint is None:
        return []
    getattr(model, "_orig_mod", model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    device = next(model.parameters()).device
    checkpoints.restore_rng(checkpoint["rng"], train_loader, device)
    return history
