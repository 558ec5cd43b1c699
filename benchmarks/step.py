"""What each part of the fast path buys: one training step of the model in each form.

    python benchmarks/step.py                  # batch 128, 4 rounds of 25 timed steps each

Random input, no data loading, SGD step included. The forms, each adding to the one before:

    original        contiguous memory, nn.ReLU + nn.Dropout (the torchvision path's model)
    channels-last   channels-last memory
    ReLUDropout     ReLU and dropout fused, 16-bit mask uniforms (fused_dropout.ReLUDropout)
    allocator       glibc keeps freed memory (devices.keep_freed_memory; the fast path's setting)

and two floors for reference, which change the model and are never trained: the same step
with dropout off (p = 0, so no mask at all), and with only the convolutions, ReLU and pooling
(no BatchNorm, no dropout). Each form runs in a fresh process, as train.py does (glibc adapts
its thresholds to what a process has freed before, so forms sharing one process would blur
the allocator's effect); the forms take turns for --rounds rounds, and each figure is the
median over rounds of the median step. The last line is a big fp32 matrix product, the
machine's reference rate.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402
from benchmarks.common import positive_int  # noqa: E402
from model import Net  # noqa: E402
from support import devices  # noqa: E402
from support.fused_dropout import fuse_relu_dropout  # noqa: E402

Step = Callable[[], None]


def make_step(net: nn.Module, batch: int, channels_last: bool) -> Step:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.nll_loss(net(x), y).backward()
        opt.step()

    return step


def fused() -> nn.Module:
    """Net as the fast path trains it: each ReLU + Dropout one ReLUDropout."""
    return fuse_relu_dropout(Net())


def convs_only() -> Net:
    """Net with each block's BatchNorm and dropout taken out: the convolutions' own cost."""
    net = Net(dropout_plan="none")  # Conv-BN-ReLU everywhere, no dropout
    for stage in net.features:
        if isinstance(stage, nn.Sequential):
            stage[1] = nn.Identity()
    return net


FORMS: dict[str, Callable[[int], Step]] = {
    "original": lambda b: make_step(Net(), b, channels_last=False),
    "channels-last": lambda b: make_step(Net(), b, channels_last=True),
    "ReLUDropout": lambda b: make_step(fused(), b, channels_last=True),
    "allocator": lambda b: make_step(fused(), b, channels_last=True),
    "floor: dropout off (p=0)": lambda b: make_step(Net(dropout=0.0), b, channels_last=True),
    "floor: convs, ReLU, pools": lambda b: make_step(convs_only(), b, channels_last=True),
}
WITH_ALLOCATOR = ("allocator", "floor: dropout off (p=0)", "floor: convs, ReLU, pools")


def time_form(name: str, batch: int, n: int, warmup: int = 5) -> float:
    """Median step time (ms) of one form, in this (fresh) process."""
    if name in WITH_ALLOCATOR:
        devices.keep_freed_memory()
    torch.manual_seed(0)
    step = FORMS[name](batch)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_in_subprocess(name: str, batch: int, n: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--form", name, "--batch-size", str(batch),
                          "--steps", str(n)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def matmul_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=positive_int, default=utils.RECIPE["batch_size"])
    p.add_argument("--steps", type=positive_int, default=25, help="timed steps per form per round")
    p.add_argument("--rounds", type=positive_int, default=4)
    p.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)  # one form, one process
    args = p.parse_args(argv)
    if args.form:
        print(f"{time_form(args.form, args.batch_size, args.steps):.3f}")
        return 0

    print(f"CPU, {torch.get_num_threads()} threads | torch {torch.__version__} "
          f"| batch {args.batch_size} | C library: {' '.join(platform.libc_ver()) or 'unknown'}")
    per_round: dict[str, list[float]] = {name: [] for name in FORMS}
    for _ in range(args.rounds):
        for name in FORMS:
            per_round[name].append(time_in_subprocess(name, args.batch_size, args.steps))
    print("| form | ms per step | vs original |\n|---|---|---|")
    base = statistics.median(per_round["original"])
    for name, ms in per_round.items():
        ms = statistics.median(ms)
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}x |")
    print(f"fp32 matrix product (2048 x 2048): {matmul_gflops():.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
