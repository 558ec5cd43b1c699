"""How a run uses its device: the fast path's settings, the allocator, determinism, compile.

The learner's code asks `prepare_model` once per run; everything that differs between
the CPU, CUDA and MPS, or between the two loaders, is decided here (docs/speed.md and
docs/gpu.md).
"""

from __future__ import annotations

import os
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
    return FastPath(
        fused_dropout=fast,
        memory_format=torch.channels_last if fast and cpu else torch.contiguous_format,
        keep_freed_memory=fast and cpu,
    )


def prepare(recipe: dict[str, Any], device: torch.device) -> FastPath:
    """Apply a run's process-wide settings (allocator, determinism) and return its fast path,
    which the run's model and loaders follow."""
    settings = fast_path(recipe, device)
    if settings.keep_freed_memory:
        keep_freed_memory()  # process-wide, and harmless to set twice
    use_deterministic(recipe["deterministic"])
    return settings


def prepare_model(model: nn.Module, recipe: dict[str, Any], device: torch.device) -> nn.Module:
    """A built model on the device, in the form the recipe's loader trains it; applied from
    outside, as torch.compile is. The fast path fuses each ReLU + Dropout into one
    ReLUDropout (same function, same state_dict keys) and, on the CPU, lays it out
    channels-last. Also applies the run's process-wide settings (see `prepare`). `recipe` may
    name only what it changes (full_recipe fills in the rest)."""
    settings = prepare(full_recipe(recipe), device)
    if settings.fused_dropout:
        fuse_relu_dropout(model)
    return model.to(device, memory_format=settings.memory_format)


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
    PyTorch CPU tuning guide gets from jemalloc or tcmalloc, without an LD_PRELOAD, so it works
    in a notebook too. Returns False where there is no glibc (macOS, Windows, musl).
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


_SWITCHES_BEFORE_DETERMINISM: dict[str, bool] | None = None


def use_deterministic(on: bool) -> None:
    """With `on`, PyTorch picks deterministic kernels (cuDNN's default choice varies from run to
    run) and full-fp32 convolutions instead of TF32 on Ampere and newer GPUs, at some speed
    cost. The CPU is deterministic for a given thread count either way. These switches are
    process-wide, so a run without `on` leaves them as it found them (a notebook user's own
    cudnn.benchmark or TF32 choice survives), except that it undoes an earlier `on`."""
    global _SWITCHES_BEFORE_DETERMINISM
    cudnn = torch.backends.cudnn
    if on:
        if _SWITCHES_BEFORE_DETERMINISM is None:
            _SWITCHES_BEFORE_DETERMINISM = {
                "algorithms": torch.are_deterministic_algorithms_enabled(),
                "deterministic": cudnn.deterministic, "benchmark": cudnn.benchmark,
                "allow_tf32": cudnn.allow_tf32}
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS asks for it
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = True, False, False
    elif _SWITCHES_BEFORE_DETERMINISM is not None:
        before, _SWITCHES_BEFORE_DETERMINISM = _SWITCHES_BEFORE_DETERMINISM, None
        torch.use_deterministic_algorithms(before["algorithms"])
        cudnn.deterministic, cudnn.benchmark = before["deterministic"], before["benchmark"]
        cudnn.allow_tf32 = before["allow_tf32"]


def compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """The training module through torch.compile, with static shapes: one graph for the
    training batch and one for the epoch's last, shorter batch. Evaluation stays eager (a
    third graph, for eval mode and the test batch, would cost more than it saves). MPS is
    refused: Inductor's MPS backend is a prototype in the torch releases this project uses."""
    if device.type == "mps":
        raise ValueError("compile is not supported on MPS here: train without it")
    return torch.compile(model, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Device choice.
# ---------------------------------------------------------------------------------------------
def get_device(name: str = "auto") -> torch.device:
    """'auto' picks the machine's accelerator, else the CPU; a named device must be available."""
    if name == "auto":
        return auto_device()
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available on this machine")
    return torch.device(name)


def auto_device() -> torch.device:
    """torch.accelerator names the machine's accelerator (torch 2.6+, as pytorch/examples'
    mnist picks it); an older torch is asked for CUDA, then Apple's MPS."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.current_accelerator() if accelerator.is_available() else (
            torch.device("cpu"))
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
