"""Time the two training pipelines side by side, in one process, on the same model and device.

    python benchmarks/speed.py                 # training throughput of both loaders
    python benchmarks/speed.py --epoch         # also one full epoch (train + test) of each
    python benchmarks/speed.py --compile       # also the fast path under torch.compile

On CUDA the full epoch is always timed: it runs `fit` itself, with the host reads it makes every
25 batches, and prints seconds per epoch.

`torchvision` is the original pipeline (per-sample PIL transforms in a DataLoader, the model in
its original form); `fast` keeps MNIST on the device, augments whole batches and runs the model
channels-last with ReLU and dropout fused (fused_dropout.ReLUDropout), and on a glibc CPU keeps
freed memory for reuse (devices.keep_freed_memory, set when the fast run is built, after the
torchvision run). The last line is the speed-up of fast over torchvision;
benchmarks/step.py shows what each part of the compute buys.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
import utils  # noqa: E402
from benchmarks.common import non_negative_int, positive_int  # noqa: E402
from support import devices, mnist_files  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def throughput(run: train.Run, steps: int, warmup: int) -> float:
    """Training images per second over `steps` steps, data loading included, after warm-up."""
    model, opt, device = run.trained, run.optimizer, run.device
    model.train()
    done, images, start = 0, 0, None
    while done < warmup + steps:
        for x, y in run.train_loader:
            if done == warmup:
                sync(device)
                start, images = time.perf_counter(), 0
            x, y = devices.to_device(x, device), devices.to_device(y, device)
            opt.zero_grad(set_to_none=True)
            F.nll_loss(model(x), y).backward()
            opt.step()
            images += len(y)
            done += 1
            if done == warmup + steps:
                break
    sync(device)
    return images / (time.perf_counter() - start)


def one_epoch(run: train.Run) -> float:
    run.recipe["epochs"] = len(run.history) + 1
    train.fit(run, progress=False, log=False)
    return run.history[-1]["seconds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=utils.RECIPE["batch_size"])
    p.add_argument("--steps", type=positive_int, default=100,
                   help="timed training steps per loader")
    p.add_argument("--warmup", type=non_negative_int, default=10,
                   help="untimed steps before them")
    p.add_argument("--epoch", action="store_true", help="also time one full epoch of each")
    p.add_argument("--compile", action="store_true", help="also time fast + torch.compile")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    args = p.parse_args(argv)

    device = devices.get_device(args.device)
    if device.type == "cuda":
        args.epoch = True  # on a GPU the figure that matters is what fit costs, syncs included
    mnist_files.ensure_mnist(args.data_dir, verbose=False)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"device: {device} ({name}) | torch {torch.__version__} | batch {args.batch_size}")

    variants = [("torchvision", False), ("fast", False)]
    if args.compile:
        variants.append(("fast", True))
    rows = {}
    for loader, compiled in variants:
        label = loader + (" + compile" if compiled else "")
        recipe = {"loader": loader, "batch_size": args.batch_size, "compile": compiled}
        run = train.build_run(recipe, device, args.data_dir)
        rate = throughput(run, args.steps, args.warmup)
        epoch = one_epoch(run) if args.epoch else None
        rows[label] = (rate, epoch)
        shown = f"{epoch:8.1f}" if epoch is not None else "       -"
        print(f"{label:<20} {rate:10.0f} img/s   epoch (train+test) {shown} s", flush=True)

    base, fast = rows["torchvision"], rows["fast"]
    print("| loader | train images/s | epoch s |\n|---|---|---|")
    for label, (rate, epoch) in rows.items():
        print(f"| {label} | {rate:,.0f} | {'-' if epoch is None else f'{epoch:.1f}'} |")
    if args.epoch:
        print(f"speed-up of fast over torchvision: {base[1] / fast[1]:.2f}x per epoch "
              f"({fast[0] / base[0]:.2f}x training throughput)")
    else:
        print(f"speed-up of fast over torchvision: {fast[0] / base[0]:.2f}x training throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
