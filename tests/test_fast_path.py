"""The fast loader: same augmentations as the original, every image once per epoch, and a seed
that fixes the whole run."""

from __future__ import annotations

import math
import platform
import subprocess
import sys

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import utils


@pytest.fixture(scope="module")
def digits(mnist_dir) -> torch.Tensor:
    """64 real training digits as (N, 1, 28, 28) floats in [0, 1]."""
    images, _ = utils.load_mnist_tensors(mnist_dir, train=True)
    return images[:64].unsqueeze(1).float() / 255


def no_crop(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool)


def test_identity_when_angle_zero_and_no_crop(digits):
    out = utils.augment_batch(digits, torch.zeros(len(digits)), no_crop(len(digits)))
    # grid_sample's identity is exact up to float rounding of the sampling coordinates
    torch.testing.assert_close(out, digits, atol=1e-5, rtol=0)
    torch.testing.assert_close(utils.normalize(out), (digits - utils.MEAN) / utils.STD,
                               atol=5e-5, rtol=0)


def test_crop_resize_matches_torchvision_center_crop_then_resize(digits):
    expected = TF.resize(TF.center_crop(digits, 22), [28, 28],
                         interpolation=InterpolationMode.BILINEAR, antialias=True)
    out = utils.augment_batch(digits, torch.zeros(len(digits)),
                              torch.ones(len(digits), dtype=torch.bool))
    diff = (out - expected).abs()
    assert diff.mean() < 2e-3
    assert diff.max() < 0.15


@pytest.mark.parametrize("mode,interp", [("nearest", InterpolationMode.NEAREST),
                                         ("bilinear", InterpolationMode.BILINEAR)])
@pytest.mark.parametrize("angle", [-15.0, -7.5, 4.0, 15.0])
def test_rotation_matches_torchvision_rotate(digits, angle, mode, interp):
    expected = TF.rotate(digits, angle, interpolation=interp, fill=0)
    out = utils.augment_batch(digits, torch.full((len(digits),), angle), no_crop(len(digits)),
                              mode=mode)
    assert (out - expected).abs().max() < 1e-4


def test_rotation_matches_the_original_pil_pipeline(mnist_dir):
    """The original rotates PIL images with nearest-neighbour: same pixels as the fast path."""
    images, _ = utils.load_mnist_tensors(mnist_dir, train=True)
    pil = TF.to_pil_image(images[0])
    expected = T.ToTensor()(TF.rotate(pil, 12.0, fill=0))
    out = utils.augment_batch(images[:1].unsqueeze(1).float() / 255, torch.tensor([12.0]),
                              no_crop(1), mode="nearest")
    assert (out[0] - expected).abs().max() < 1e-6


def test_augment_params_are_uniform_angles_and_ten_percent_crops():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    angles, crop = utils.sample_augment_params(n, gen)
    assert angles.min() >= -15 and angles.max() <= 15
    assert angles.min() < -14.9 and angles.max() > 14.9
    counts = torch.histc(angles, bins=6, min=-15, max=15) / n
    torch.testing.assert_close(counts, torch.full((6,), 1 / 6), atol=0.006, rtol=0)
    assert abs(crop.float().mean().item() - 0.1) < 0.003


def test_augment_batch_applies_each_images_own_angle(digits):
    """A batch with mixed angles equals each image rotated alone."""
    angles = torch.linspace(-15, 15, 8)
    crop = torch.tensor([True, False] * 4)
    batch = utils.augment_batch(digits[:8], angles, crop)
    for i in range(8):
        alone = utils.augment_batch(digits[i:i + 1], angles[i:i + 1], crop[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-6, rtol=0)


def index_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is uniformly i (so its centre survives any crop or rotation); label i % 10."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 28, 28).contiguous()
    return images, torch.arange(n) % 10


def centre_indices(x: torch.Tensor) -> torch.Tensor:
    centre = x[:, 0, 14, 14] * utils.STD + utils.MEAN
    return torch.round(centre * 255).long()


def check_one_epoch(loader, n: int) -> None:
    seen, labels = [], []
    for x, y in loader:
        seen.append(centre_indices(x))
        labels.append(y)
    seen, labels = torch.cat(seen), torch.cat(labels)
    assert sorted(seen.tolist()) == list(range(n))
    assert torch.equal(labels, seen % 10)


def test_device_loader_yields_every_image_once_with_its_label():
    images, labels = index_images(200)
    loader = utils.DeviceLoader(images, labels, batch_size=32, device="cpu", train=True, seed=3)
    assert len(loader) == math.ceil(200 / 32)
    for _ in range(2):  # and again, in a new order, the next epoch
        check_one_epoch(loader, 200)


def test_torchvision_loader_yields_every_image_once_with_its_label(tmp_path):
    images, labels = index_images(200)
    raw = utils.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    files = {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": labels,
             "t10k-images-idx3-ubyte": images[:50], "t10k-labels-idx1-ubyte": labels[:50]}
    for name, array in files.items():
        (raw / name).write_bytes(utils.encode_idx(array.numpy()))
    train, _ = utils.torchvision_loaders(tmp_path, batch_size=32, test_batch_size=50, seed=0,
                                         num_workers=0)
    check_one_epoch(train, 200)


def test_fast_runs_with_the_same_seed_are_identical(mnist_dir):
    recipe = dict(epochs=1, limit_train=512, limit_test=256, batch_size=64)
    runs = []
    for _ in range(2):  # each Run seeds the global generator when built: build, then train
        runs.append(utils.Run(recipe, torch.device("cpu"), mnist_dir))
        runs[-1].fit(progress=False, log=False)
    a, b = (dict(r.history) for r in runs)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    for (name, p), (_, q) in zip(runs[0].model.state_dict().items(),
                                 runs[1].model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------
# keep_freed_memory: freed activation memory is reused, not faulted in afresh every step.
# ---------------------------------------------------------------------------------------------
PAGE_FAULTS = """
import resource, sys, torch, utils
from model import Net
torch.set_num_threads(1)
if sys.argv[1] == "on":
    assert utils.keep_freed_memory()
torch.manual_seed(0)
net = Net().to(memory_format=torch.channels_last)
x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
def step():
    net.zero_grad(set_to_none=True)
    net(x).sum().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_stops_the_page_faults_of_reused_blocks(repo_root):
    def faults(setting: str) -> int:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, setting], cwd=repo_root,
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    # Per training step at batch 128: thousands of fresh pages by default, next to none after.
    assert faults("off") > 2_000
    assert faults("on") < 500
