"""What differs between the CPU, CUDA and MPS: the fast path's settings, the process's, compile.

`prepare_model` changes the model only, so a notebook's kernel keeps its own settings. The
process-wide ones (glibc's allocator, determinism) are train.py's: `configure_process`, once
per run (docs/speed.md and docs/gpu.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from support.fused_dropout import fuse_relu_dropout
from support.recipe import full_recipe


@dataclass(frozen=True)
class FastPath:
    """What `--loader fast` switches on besides the data; decided in `fast_path` only."""

    fused_dropout: bool  # fused_dropout.ReLUDropout for nn.ReLU + nn.Dropout (same function)
    memory_format: torch.memory_format  # of the model and of each batch
    keep_freed_memory: bool  # the process-wide glibc setting, see keep_freed_memory()


def fast_path(recipe: dict[str, Any], device: torch.device) -> FastPath:
    """The torchvision loader runs the model as the original did. The fast one also fuses
    ReLU and dropout (a CPU kernel; elsewhere ReLUDropout is plain relu + dropout), and on
    the CPU only, where both were measured to help (docs/speed.md), runs channels-last and
    keeps freed memory. On MPS some torch releases ran channels-last convolution backward
    slowly or wrongly, and on CUDA it was never measured."""
    fast, cpu = recipe["loader"] == "fast", device.type == "cpu"
    return FastPath(fused_dropout=fast,
                    memory_format=torch.channels_last if fast and cpu else torch.contiguous_format,
                    keep_freed_memory=fast and cpu)


def prepare_model(model: nn.Module, recipe: dict[str, Any], device: torch.device) -> nn.Module:
    """A built model on the device, in the form the recipe's loader trains it; applied from
    outside, as torch.compile is. The fast path fuses each ReLU + Dropout into one
    ReLUDropout (same function, same state_dict keys) and, on the CPU, lays it out
    channels-last. Nothing outside the model changes: the recipe's `deterministic` and the
    allocator are the process's (`configure_process`, which train.py calls)."""
    settings = fast_path(full_recipe(recipe), device)
    if settings.fused_dropout:
        fuse_relu_dropout(model)
    return model.to(device, memory_format=settings.memory_format)


def configure_process(recipe: dict[str, Any], device: torch.device) -> None:
    """train.py's process-wide settings for a run: the fast path's allocator on the CPU, and
    deterministic kernels when the recipe asks. Both hold until the process ends."""
    recipe = full_recipe(recipe)
    if fast_path(recipe, device).keep_freed_memory:
        keep_freed_memory()  # harmless to set twice
    if recipe["deterministic"]:
        use_deterministic()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to the device; asynchronously only on CUDA, where the torchvision loader
    pins its memory. On MPS some torch releases corrupted non-blocking copies (the CPU batch
    was freed before the copy ended), and elsewhere they buy nothing."""
    return x.to(device, non_blocking=device.type == "cuda")


# glibc's mallopt() parameters (malloc.h) and the values the fast path sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Make glibc keep freed tensor memory for reuse instead of returning it to the OS.

    By default glibc hands each multi-megabyte block back to the kernel when it is freed (and
    trims the heap), so every training step pays page faults to get fresh, zeroed pages for the
    same activations: about 4,500 faults and 10% of a step here. Raising the two thresholds
    keeps those blocks in the heap (the process holds on to its peak memory). This is what the
    PyTorch CPU tuning guide gets from jemalloc or tcmalloc, without an LD_PRELOAD. Returns
    False where there is no glibc (macOS, Windows, musl).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def use_deterministic() -> None:
    """Deterministic kernels (cuDNN's default choice varies from run to run) and full-fp32
    convolutions instead of TF32 on Ampere and newer GPUs, at some speed cost. The CPU is
    deterministic for a given thread count either way."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS asks for it
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn = torch.backends.cudnn
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = True, False, False


def compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """The training module through torch.compile, with static shapes: one graph for the
    training batch and one for the epoch's last, shorter batch. Evaluation stays eager (a
    third graph, for eval mode and the test batch, would cost more than it saves). MPS is
    refused: Inductor's MPS backend is a prototype in the torch releases this project uses."""
    if device.type == "mps":
        raise ValueError("compile is not supported on MPS here: train without it")
    return torch.compile(model, dynamic=False)


def get_device(name: str = "auto") -> torch.device:
    """'auto' picks the machine's accelerator, else the CPU; a named device must be available.
    torch.accelerator names it (torch 2.6+, as pytorch/examples' mnist picks it); an older
    torch is asked for CUDA, then Apple's MPS."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if name == "auto":
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None:
            return accelerator.current_accelerator() if accelerator.is_available() else (
                torch.device("cpu"))
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if available[kind]))
    if name not in available:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available on this machine")
    return torch.device(name)
