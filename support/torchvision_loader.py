"""The original S6 loaders (`--loader torchvision`): torchvision's MNIST, one PIL image at a
time through the write-up's transforms, in DataLoader workers that leave Ctrl-C to the main
process. The fast loader (utils.get_loaders) gives the same pixels for the same draws.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from support.augment import CROP_P, CROP_SIZE, MAX_ANGLE, augmentation_parts
from support.recipe import MEAN, STD
from support.workers import CtrlCSafeDataLoader, leave_ctrl_c


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


def torchvision_loaders(recipe: dict[str, Any], data_dir: str | os.PathLike,
                        device: torch.device, num_workers: int | None = None
                        ) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """DataLoaders over torchvision's MNIST for a full recipe; `loader.generator` holds the
    shuffling state. Pinned memory on CUDA, where the copy to the device is asynchronous."""
    from torch.utils.data import Subset
    from torchvision.datasets import MNIST

    train_ds = MNIST(str(data_dir), train=True, download=False,
                     transform=train_transforms(recipe["augmentation"]))
    if recipe["limit_train"]:
        train_ds = Subset(train_ds, range(min(recipe["limit_train"], len(train_ds))))
    # Workers are not persistent: each epoch re-seeds them from `generator`, so a resumed run
    # draws the same augmentations as an uninterrupted one. They leave Ctrl-C to this process.
    gen = torch.Generator().manual_seed(recipe["seed"])
    train = CtrlCSafeDataLoader(train_ds, batch_size=recipe["batch_size"], shuffle=True,
                                generator=gen, **_workers(device, num_workers))
    return train, torchvision_test_loader(recipe, data_dir, device, num_workers)


def torchvision_test_loader(recipe: dict[str, Any], data_dir: str | os.PathLike,
                            device: torch.device, num_workers: int | None = None
                            ) -> torch.utils.data.DataLoader:
    """The test set alone (train.py --evaluate reads no training file)."""
    from torch.utils.data import Subset
    from torchvision.datasets import MNIST

    test_ds = MNIST(str(data_dir), train=False, download=False, transform=test_transforms())
    if recipe["limit_test"]:
        test_ds = Subset(test_ds, range(min(recipe["limit_test"], len(test_ds))))
    return CtrlCSafeDataLoader(test_ds, batch_size=recipe["test_batch_size"], shuffle=False,
                               **_workers(device, num_workers))


def _workers(device: torch.device, num_workers: int | None) -> dict[str, Any]:
    return dict(num_workers=min(2, os.cpu_count() or 1) if num_workers is None else num_workers,
                pin_memory=device.type == "cuda", worker_init_fn=leave_ctrl_c)
