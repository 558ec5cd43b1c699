"""The original's training augmentation on whole batches, with Pillow's own arithmetic.

torchvision augments one PIL image at a time: with probability 0.1 a centre crop to 22x22
resized back to 28x28 (bilinear), then a rotation by a uniform angle in ±15° (nearest
neighbour, filled with 0). The fast loader does the same to a whole uint8 batch on its device,
and gets the same pixels, byte for byte, for the same draws: the resize and the rotation below
transcribe Pillow's fixed-point code (libImaging/Resample.c and Geometry.c). utils.augment
applies the two steps in the write-up's order.
"""

from __future__ import annotations

import functools
import math

import torch

CROP_SIZE, CROP_P, MAX_ANGLE = 22, 0.1, 15.0
# Which of the original's two augmentations a recipe applies, as (crop-resize, rotation).
AUGMENTATIONS: dict[str, tuple[bool, bool]] = {
    "both": (True, True), "rotate": (False, True), "crop": (True, False), "none": (False, False)}


def augmentation_parts(name: str) -> tuple[bool, bool]:
    """(crop, rotate) of an AUGMENTATIONS name; an unknown name is refused, not ignored."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}: use one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]


def sample_augment_params(n: int, generator: torch.Generator,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image rotation angles (degrees, uniform in ±MAX_ANGLE) and crop flags (p = CROP_P)."""
    draws = torch.rand(2, n, generator=generator, device=device)
    return (draws[0] * 2 - 1) * MAX_ANGLE, draws[1] < CROP_P


def augment_batch(images: torch.Tensor, angles: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """Both steps of (N, 1, H, W) uint8 images for given draws: crop-resize, then rotation."""
    return rotate_nearest(crop_resize(images, crop), angles)


def crop_resize(images: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """The images flagged in `crop` centre-cropped to CROP_SIZE and resized back bilinearly.
    Computed for every image and kept where flagged: on a GPU that is cheaper than gathering
    the 10% that need it, which would read their count back to the host."""
    h, w = images.shape[-2:]
    top, left = round((h - CROP_SIZE) / 2), round((w - CROP_SIZE) / 2)  # as TF.center_crop
    zoomed = pil_resize(images[..., top:top + CROP_SIZE, left:left + CROP_SIZE], (h, w))
    return torch.where(crop.view(-1, 1, 1, 1), zoomed, images)


# Pillow's coefficients carry 22 fractional bits for 8-bit images (PRECISION_BITS in
# Resample.c), and each pass rounds its result to a byte.
PIL_PRECISION_BITS = 22


@functools.lru_cache(maxsize=8)
def pil_bilinear_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight), each (taps, out_size): Pillow's bilinear filter as integer coefficients,
    as precompute_coeffs and normalize_coeffs_8bpc in Resample.c compute them."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # the filter's support, 1, times the scale when shrinking
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xs = range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size))
        weights = [max(0.0, 1.0 - abs((x - center + 0.5) / support)) for x in xs]
        rows.append([(x, math.floor(0.5 + w / sum(weights) * (1 << PIL_PRECISION_BITS)))
                     for x, w in zip(xs, weights, strict=True)])
    taps = max(len(r) for r in rows)
    rows = [r + [(0, 0)] * (taps - len(r)) for r in rows]  # pad with zero-weight taps
    index = torch.tensor([[x for x, _ in r] for r in rows]).T.contiguous()
    weight = torch.tensor([[k for _, k in r] for r in rows], dtype=torch.int32).T.contiguous()
    return index, weight


def _pil_pass(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Resample the last dim of int32 x with Pillow's taps; round and clamp to a byte."""
    acc = torch.full((*x.shape[:-1], index.shape[1]), 1 << (PIL_PRECISION_BITS - 1),
                     dtype=torch.int32, device=x.device)
    for i, k in zip(index.to(x.device), weight.to(x.device), strict=True):
        acc += x.index_select(-1, i) * k  # at most 255 * 2^22 in all: fits in int32
    return (acc >> PIL_PRECISION_BITS).clamp_(0, 255)


def pil_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's bilinear Image.resize of uint8 (..., H, W) images: width first, then height."""
    h, w = images.shape[-2:]
    x = _pil_pass(images.to(torch.int32), *pil_bilinear_taps(w, size[1]))
    x = _pil_pass(x.transpose(-1, -2), *pil_bilinear_taps(h, size[0])).transpose(-1, -2)
    return x.to(torch.uint8)


def rotate_nearest(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.rotate(angle, NEAREST, fillcolor=0) of each (C, H, W) image, as one gather.

    Pillow rotates by -angle about (W/2, H/2): each output pixel centre is mapped back into the
    input by an affine matrix held in 16.16 fixed point (affine_fixed in Geometry.c), and takes
    the pixel whose square holds that point, or 0 outside the image.
    """
    n, c, h, w = images.shape
    # MPS has no float64; there a matrix entry may round to its neighbouring 1/65536 (rarely).
    dtype = torch.float32 if images.device.type == "mps" else torch.float64
    rad = -torch.deg2rad(angles.to(dtype)).view(n, 1, 1)
    a, b = torch.cos(rad), torch.sin(rad)  # input x = a*x + b*y + tx, input y = -b*x + a*y + ty
    cx, cy = w / 2, h / 2
    tx, ty = cx - a * cx - b * cy, cy + b * cx - a * cy

    def fix(v: torch.Tensor) -> torch.Tensor:  # int32 holds it: |v| < 2^15 here
        return torch.floor(v * 65536 + 0.5).int()

    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.int32),
                            torch.arange(w, device=images.device, dtype=torch.int32),
                            indexing="ij")
    u = fix(tx + (a + b) / 2) + xs * fix(a) + ys * fix(b)  # Pillow starts at the pixel's centre
    v = fix(ty + (a - b) / 2) + xs * fix(-b) + ys * fix(a)
    col, row = u >> 16, v >> 16  # floor, as Pillow's arithmetic shift
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    source = torch.where(inside, row * w + col, 0).long().view(n, 1, h * w)
    out = images.reshape(n, c, h * w).gather(2, source.expand(n, c, h * w))
    return torch.where(inside.view(n, 1, h * w), out, 0).view(n, c, h, w)
