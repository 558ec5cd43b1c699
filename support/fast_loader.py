"""The fast loader: MNIST held as uint8 on the device, each batch shuffled, augmented (by the
function it is given: utils.augment) and normalised there. utils.get_loaders builds it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import TensorDataset

from support.recipe import MEAN, STD


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


class DeviceLoader:
    """Yields (images, labels) like a DataLoader. All randomness comes from `self.generator`,
    on the loader's device, so a seed fixes the whole sequence of batches. A training loader
    (`train`) shuffles, and passes each batch through `augment` (uint8 images and the generator
    in, uint8 images out) when given."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: torch.device | str, train: bool, seed: int = 0,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 ) -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device).unsqueeze(1)  # (N, 1, 28, 28) uint8
        self.labels = labels.to(self.device)
        self.dataset = TensorDataset(self.images, self.labels)  # len(loader.dataset), as DataLoader
        self.batch_size, self.train, self.augment = batch_size, train, augment
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
            if self.train and self.augment is not None:
                x = self.augment(x, self.generator)
            x = normalize(x.float().div_(255))  # as ToTensor then Normalize
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]
