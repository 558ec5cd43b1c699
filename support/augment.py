"""The original's training augmentation on whole batches, with Pillow's own arithmetic.

torchvision augments one PIL image at a time: with probability 0.1 a centre crop to 22x22
resized back to 28x28 (bilinear), then a rotation by a uniform angle in ±15° (nearest
neighbour, filled with 0). The fast loader (fast_loader.DeviceLoader) does the same to a whole
uint8 batch on its device, and gets the same pixels, byte for byte, for the same draws: the bilinear
resize and the rotation below transcribe Pillow's fixed-point code (libImaging/Resample.c and
Geometry.c). Read top to bottom: the settings, the draws, the batch transform (utils.augment
applies its two steps in the write-up's order), then Pillow's two operations.
"""

from __future__ import annotations

import functools
import math

import torch

CROP_SIZE, CROP_P, MAX_ANGLE = 22, 0.1, 15.0
# Which of the original's two augmentations a recipe applies, as (crop-resize, rotation).
AUGMENTATIONS: dict[str, tuple[bool, bool]] = {
    "both": (True, True),
    "rotate": (False, True),
    "crop": (True, False),
    "none": (False, False),
}


def augmentation_parts(name: str) -> tuple[bool, bool]:
    """(crop, rotate) of an AUGMENTATIONS name; an unknown name is refused, not ignored."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}: use one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]


def sample_augment_params(
    n: int, generator: torch.Generator, device: torch.device | str = "cpu",
    crop_p: float = CROP_P, max_angle: float = MAX_ANGLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image rotation angles (degrees, uniform in ±max_angle) and crop flags (p = crop_p)."""
    draws = torch.rand(2, n, generator=generator, device=device)
    angles = (draws[0] * 2 - 1) * max_angle
    crop = draws[1] < crop_p
    return angles, crop


def augment_batch(images: torch.Tensor, angles: torch.Tensor, crop: torch.Tensor,
                  crop_size: int = CROP_SIZE) -> torch.Tensor:
    """The original's augmentation of a whole batch for given draws (utils.augment draws them):
    `crop_resize`, then `rotate_nearest`. `images` is (N, 1, H, W) uint8."""
    return rotate_nearest(crop_resize(images, crop, crop_size), angles)


def crop_resize(images: torch.Tensor, crop: torch.Tensor,
                crop_size: int = CROP_SIZE) -> torch.Tensor:
    """The images flagged in `crop` centre-cropped to `crop_size` and resized back bilinearly,
    with PIL's arithmetic (`pil_resize`), on the batch's device and without a host sync: the
    crop-resize is computed for every image and kept where flagged, which is cheaper on a GPU
    than gathering the 10% that need it (that would read their count back)."""
    h, w = images.shape[-2:]
    top, left = round((h - crop_size) / 2), round((w - crop_size) / 2)  # as TF.center_crop
    zoomed = pil_resize(images[..., top:top + crop_size, left:left + crop_size], (h, w))
    return torch.where(crop.view(-1, 1, 1, 1), zoomed, images)


# PIL's fixed-point resampling: coefficients carry 22 fractional bits for 8-bit images
# (PRECISION_BITS in libImaging/Resample.c), and each pass rounds its result to a byte.
PIL_PRECISION_BITS = 22


@functools.lru_cache(maxsize=8)
def pil_bilinear_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight), each (taps, out_size): PIL's bilinear filter as integer coefficients.

    A transcription of precompute_coeffs and normalize_coeffs_8bpc in Pillow's Resample.c,
    so that the fast path's zoomed digits are byte for byte those of Image.resize.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the bilinear filter's support is 1
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        weights = [max(0.0, 1.0 - abs((x - center + 0.5) / filterscale))
                   for x in range(xmin, xmax)]
        total = sum(weights)
        rows.append([(x, math.floor(0.5 + wt / total * (1 << PIL_PRECISION_BITS)))
                     for x, wt in zip(range(xmin, xmax), weights, strict=True)])
    taps = max(len(r) for r in rows)
    rows = [r + [(0, 0)] * (taps - len(r)) for r in rows]  # pad with zero-weight taps
    index = torch.tensor([[x for x, _ in r] for r in rows]).T.contiguous()
    weight = torch.tensor([[k for _, k in r] for r in rows], dtype=torch.int32).T.contiguous()
    return index, weight


def _pil_pass(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Resample the last dim of int32 x with PIL's taps; round and clamp to a byte as PIL."""
    acc = torch.full((*x.shape[:-1], index.shape[1]), 1 << (PIL_PRECISION_BITS - 1),
                     dtype=torch.int32, device=x.device)
    for i, k in zip(index.to(x.device), weight.to(x.device), strict=True):
        acc += x.index_select(-1, i) * k  # at most 255 * 2^22 in all: fits in int32
    return (acc >> PIL_PRECISION_BITS).clamp_(0, 255)


def pil_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's bilinear Image.resize of uint8 (..., H, W) images: width first, then height."""
    h, w = images.shape[-2:]
    x = images.to(torch.int32)
    x = _pil_pass(x, *pil_bilinear_taps(w, size[1]))
    x = _pil_pass(x.transpose(-1, -2), *pil_bilinear_taps(h, size[0])).transpose(-1, -2)
    return x.to(torch.uint8)


def rotate_nearest(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """PIL's Image.rotate(angle, NEAREST, fillcolor=0) of each (C, H, W) image, as one gather.

    PIL rotates by -angle about (W/2, H/2): each output pixel centre is mapped back into the
    input with an affine matrix held in 16.16 fixed point (affine_fixed in Pillow's
    Geometry.c), and takes the pixel whose square holds that point, or 0 outside the image.
    The same integers here give the same pixels.
    """
    n, c, h, w = images.shape
    # MPS has no float64; there a matrix entry may round to its neighbouring 1/65536 (rarely).
    dtype = torch.float32 if images.device.type == "mps" else torch.float64
    rad = -torch.deg2rad(angles.to(dtype)).view(n, 1, 1)
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx, cy = w / 2, h / 2

    def fix(v: torch.Tensor) -> torch.Tensor:  # int32 holds it: |v| < 2^15 here
        return torch.floor(v * 65536 + 0.5).int()

    # Rows of PIL's matrix: input x = a*x + b*y + tx, input y = d*x + e*y + ty.
    a, b, d, e = cos, sin, -sin, cos
    tx, ty = cx - a * cx - b * cy, cy - d * cx - e * cy
    x, y = _pixel_indices(h, w, images.device)
    u = fix(tx + (a + b) / 2) + x * fix(a) + y * fix(b)  # PIL starts at the pixel's centre
    v = fix(ty + (d + e) / 2) + x * fix(d) + y * fix(e)
    col, row = u >> 16, v >> 16  # floor, as PIL's arithmetic shift
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    source = torch.where(inside, row * w + col, 0).long().view(n, 1, h * w)
    out = images.reshape(n, c, h * w).gather(2, source.expand(n, c, h * w))
    return torch.where(inside.view(n, 1, h * w), out, 0).view(n, c, h, w)


@functools.lru_cache(maxsize=8)
def _pixel_indices(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row index of every pixel, each (H, W) int32."""
    ys = torch.arange(h, device=device, dtype=torch.int32)
    xs = torch.arange(w, device=device, dtype=torch.int32)
    row, col = torch.meshgrid(ys, xs, indexing="ij")
    return col, row
