"""The fast loader: MNIST held as uint8 on the device, each batch shuffled, augmented (with
support.augment's whole-batch, pixel-exact crop-resize and rotation) and normalised there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import TensorDataset

from support.augment import augment_batch, augmentation_parts, sample_augment_params
from support.mnist_files import load_mnist_tensors
from support.recipe import MEAN, STD


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
