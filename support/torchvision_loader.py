"""The original S6 loaders (`--loader torchvision`): torchvision's MNIST, one PIL image at a
time through the write-up's transforms, in DataLoader workers that leave Ctrl-C to the main
process. The fast loader (utils.get_loaders) gives the same pixels for the same draws.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader

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
    return train_transforms("none")


def torchvision_loaders(recipe: dict[str, Any], data_dir: str | os.PathLike,
                        device: torch.device, num_workers: int | None = None
                        ) -> tuple[DataLoader, DataLoader]:
    """DataLoaders over torchvision's MNIST for a full recipe; `loader.generator` holds the
    shuffling state. Workers are not persistent: each epoch re-seeds them from the generator,
    so a resumed run draws the same augmentations as an uninterrupted one."""
    train = _loader(recipe, data_dir, device, num_workers, train=True, shuffle=True,
                    generator=torch.Generator().manual_seed(recipe["seed"]))
    return train, torchvision_test_loader(recipe, data_dir, device, num_workers)


def torchvision_test_loader(recipe: dict[str, Any], data_dir: str | os.PathLike,
                            device: torch.device, num_workers: int | None = None) -> DataLoader:
    """The test set alone (train.py --evaluate reads no training file)."""
    return _loader(recipe, data_dir, device, num_workers, train=False, shuffle=False)


def _loader(recipe: dict[str, Any], data_dir: str | os.PathLike, device: torch.device,
            num_workers: int | None, train: bool, **options: Any) -> DataLoader:
    """A recipe's loader of one split, its `limit_*` first images; pinned memory on CUDA,
    where the copy to the device is asynchronous."""
    from torch.utils.data import Subset
    from torchvision.datasets import MNIST

    transform = train_transforms(recipe["augmentation"]) if train else test_transforms()
    dataset = MNIST(str(data_dir), train=train, download=False, transform=transform)
    limit = recipe["limit_train" if train else "limit_test"]
    if limit:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
    return CtrlCSafeDataLoader(
        dataset, batch_size=recipe["batch_size" if train else "test_batch_size"],
        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=leave_ctrl_c,
        **options)
