"""Short trainings on real MNIST: both loaders must actually learn digits."""

from __future__ import annotations

import pytest
import torch
from runs import cols

import train as cli


# The torchvision loader starts its DataLoader workers: the slow half.
@pytest.mark.parametrize("loader", ["fast", pytest.param("torchvision", marks=pytest.mark.slow)])
def test_short_training_on_real_mnist_beats_95_percent(mnist_dir, loader):
    # 2 epochs on the first 12,000 training images, scored on the first 2,000 test images.
    recipe = dict(loader=loader, epochs=2, limit_train=12_000, limit_test=2_000)
    run = cli.build_run(recipe, torch.device("cpu"), mnist_dir)
    history = cols(cli.fit(run, progress=False, log=False))
    assert len(history["epoch"]) == 2
    assert history["train_loss"][1] < history["train_loss"][0]
    assert history["test_acc"][-1] > 95.0, history
