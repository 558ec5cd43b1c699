"""Train the S6 MNIST model from the command line: `python train.py` runs the original recipe.

Flags follow pytorch/examples' mnist/main.py. A checkpoint is written after every epoch, so an
interrupted run continues with `--resume`; `--evaluate` scores a saved checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

import mnist_files
import utils
from model import CHANNELS, DROPOUT_PLANS, TRANSITIONS, count_parameters

DEFAULT_CHECKPOINT = "checkpoints/last.pt"


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    r = utils.RECIPE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"total epochs to train (default: {r['epochs']})")
    p.add_argument("--batch-size", type=positive_int, default=r["batch_size"])
    p.add_argument("--test-batch-size", type=positive_int, default=r["test_batch_size"])
    p.add_argument("--lr", type=positive_float, default=r["lr"])
    p.add_argument("--momentum", type=non_negative_float, default=r["momentum"])
    p.add_argument("--step-size", type=positive_int, default=r["step_size"],
                   help="StepLR: epochs between learning-rate drops")
    p.add_argument("--gamma", type=positive_float, default=r["gamma"],
                   help="StepLR: factor of each drop")
    p.add_argument("--seed", type=int, default=r["seed"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--loader", default=r["loader"], choices=["fast", "torchvision"],
                   help="fast: data kept and augmented on the device, and the model run with "
                        "fused ReLU-dropout (plus, on the CPU, channels-last memory and "
                        "keep_freed_memory); see utils.fast_path. torchvision: the original "
                        "per-sample pipeline and model")
    p.add_argument("--dropout-plan", default=r["dropout_plan"], choices=list(DROPOUT_PLANS),
                   help="blocks followed by dropout: table = conv1 and conv2, as the original's "
                        "table; every = every 3x3 block; none")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction,
                   default=r["batch_norm"],
                   help="BatchNorm after each conv but the last; --no-batch-norm (ablation) "
                        "removes it and gives every conv a bias")
    p.add_argument("--transitions", default=r["transitions"], choices=list(TRANSITIONS),
                   help="the two 1x1 reductions: bn-relu = Conv-BN-ReLU, as the table; "
                        "bare = a plain 1x1 conv (ablation)")
    p.add_argument("--augmentation", default=r["augmentation"],
                   choices=list(utils.AUGMENTATIONS),
                   help="both = the original's 10%% crop-resize and ±15° rotation; rotate or "
                        "crop = only one of them; none (ablation)")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (needs a C++ compiler on the CPU; not on "
                        "MPS)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels and no TF32 on CUDA (slower); the CPU is "
                        "deterministic for a given thread count anyway")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--refetch", action="store_true",
                   help="replace MNIST files that fail their checks")
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, default=None,
                   help="use only the first N test images")
    p.add_argument("--dry-run", action="store_true",
                   help="one training batch and one test batch, to check the set-up")
    p.add_argument("--save-model", metavar="PATH", default=None,
                   help=f"checkpoint written after every epoch (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--no-save", action="store_true", help="write no checkpoint")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint")
    p.add_argument("--evaluate", metavar="PATH",
                   help="score a checkpoint on the test set, then exit")
    p.add_argument("--metrics", metavar="PATH", help="write the run's history and facts as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_writable_dir(parser: argparse.ArgumentParser, path: Path, what: str) -> None:
    """Fail early, as a usage error, rather than after an epoch of training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        parser.error(f"{what} {path} is not writable: {err.strerror or err}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = utils.get_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.compile and device.type == "mps":
        parser.error("--compile is not supported on MPS here: train without it")
    check_writable_dir(parser, Path(args.data_dir), "--data-dir")
    if args.no_save:
        args.save_model = None
    elif args.save_model is None:
        args.save_model = args.resume or DEFAULT_CHECKPOINT
    if args.save_model:
        check_writable_dir(parser, Path(args.save_model).resolve().parent, "checkpoint folder")
    return args, device


def recipe_from(args: argparse.Namespace) -> dict:
    """The settings that define a run (the keys of utils.RECIPE); a checkpoint carries them, so
    a resume repeats them."""
    recipe = {key: getattr(args, key) for key in utils.RECIPE}
    if recipe["epochs"] is None:
        recipe["epochs"] = utils.RECIPE["epochs"]
    return recipe


def git_commit() -> str | None:
    """The code a result came from (with -dirty if the tree had changes), when run from git."""
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run_facts(device: torch.device, model: torch.nn.Module, recipe: dict) -> dict:
    import torchvision

    return {"model": {"channels": list(CHANNELS), "dropout_plan": recipe["dropout_plan"],
                      "augmentation": "pil-exact"},
            "commit": git_commit(),
            "parameters": count_parameters(model), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__}


def main(argv: list[str] | None = None) -> int:
    args, device = parse_args(argv)
    try:
        mnist_files.ensure_mnist(args.data_dir, refetch=args.refetch, verbose=not args.quiet)
    except (mnist_files.DataFileError, mnist_files.MnistUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    if args.evaluate:
        return evaluate_checkpoint(args, device)

    checkpoint = None
    if args.resume:
        try:
            checkpoint = utils.load_checkpoint(args.resume)
        except utils.CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        recipe = checkpoint["recipe"]
        if args.epochs is not None:
            recipe["epochs"] = args.epochs
    else:
        recipe = recipe_from(args)
    if args.dry_run:
        recipe.update(epochs=1, limit_train=recipe["batch_size"],
                      limit_test=recipe["test_batch_size"])

    run = utils.Run(recipe, device, args.data_dir)
    if checkpoint is not None:
        run.restore(checkpoint)
        done = len(run.history["epoch"])
        print(f"resuming {args.resume} after epoch {done} of {recipe['epochs']}")
    print(f"device: {device} | loader: {recipe['loader']} | "
          f"parameters: {count_parameters(run.model):,}")

    def save(history: dict) -> None:
        if args.save_model:
            run.save(args.save_model)

    try:
        run.fit(on_epoch_end=save, progress=not args.quiet)
    except KeyboardInterrupt:
        done = len(run.history["epoch"])
        print(f"\ninterrupted during epoch {done + 1}.", file=sys.stderr)
        if args.save_model and done:
            print(f"epoch {done} is saved in {args.save_model}; continue with:\n"
                  f"  python train.py --resume {args.save_model}", file=sys.stderr)
        else:
            print("no complete epoch was saved.", file=sys.stderr)
        return 130
    except utils.NonFiniteLoss as err:
        done = len(run.history["epoch"])
        kept = (f"the last good checkpoint (epoch {done}) is {args.save_model}"
                if args.save_model and done else "no good epoch was saved")
        print(f"error: {err}; stopped. Try a smaller --lr. {kept}.", file=sys.stderr)
        return 1

    if args.metrics:
        write_metrics(args.metrics, run, recipe, device)
    final = run.history["test_acc"][-1]
    print(f"final test accuracy: {final:.2f}% after {len(run.history['epoch'])} epochs")
    return 0


def write_metrics(path: str, run: utils.Run, recipe: dict, device: torch.device) -> None:
    out = {"recipe": recipe, **run_facts(device, run.model, recipe), "history": run.history,
           "final_test_acc": run.history["test_acc"][-1],
           "best_test_acc": max(run.history["test_acc"])}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def evaluate_checkpoint(args: argparse.Namespace, device: torch.device) -> int:
    try:
        checkpoint = utils.load_checkpoint(args.evaluate)
    except utils.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    recipe = {**checkpoint["recipe"], "test_batch_size": args.test_batch_size,
              "limit_test": args.limit_test}
    recipe = utils.full_recipe({k: v for k, v in recipe.items() if k in utils.RECIPE})
    model = utils.build_model(recipe, device)
    model.load_state_dict(checkpoint["model"])
    _, test_loader = utils.make_loaders(recipe, args.data_dir, device)
    loss, acc = utils.evaluate(model, test_loader, device)
    print(f"{args.evaluate}: test loss {loss:.4f}, accuracy {acc:.2f}% "
          f"on {utils.dataset_size(test_loader):,} images")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
