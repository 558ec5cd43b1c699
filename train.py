"""Train the S6 MNIST model from a terminal: the notebook's recipe, without the notebook.

    python train.py                                  # the original recipe: 20 epochs, seed 1
    python train.py --resume checkpoints/last.pt     # continue an interrupted run
    python train.py --evaluate checkpoints/last.pt   # score a saved model on the test set
    python train.py --head gap --width 0.7           # a variant (README, "What each part buys")
    python train.py --help                           # every flag

Flags follow pytorch/examples' mnist/main.py. A checkpoint is written after every epoch. Every
flag and path is checked before any work starts, an existing checkpoint is never replaced
without `--force`, and every message about what was saved is checked against the file on disk.
Read top to bottom: the flags, `main`, the checks of flags and paths, resume and evaluate, what
is on disk when a run stops, and the run itself.
"""

from __future__ import annotations

import signal
import sys

# Ctrl-C while torch loads (seconds) is the user's choice, not a crash. A KeyboardInterrupt
# raised inside an import can be swallowed by a library's bare `except`, so until the imports
# are done Ctrl-C only takes note (main() then stops).
_ctrl_c_while_starting: list[int] = []
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, lambda signum, frame: _ctrl_c_while_starting.append(signum))

import argparse
import json
import math
import os
import platform
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoints
import devices
import mnist_files
import utils
from augment import AUGMENTATIONS
from model import DROPOUT_PLANS, HEADS, MAX_WIDTH, TRANSITIONS, count_parameters

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if _ctrl_c_while_starting:
    print("\ninterrupted (Ctrl-C) while starting; nothing was trained or saved.",
          file=sys.stderr)
    sys.exit(128 + signal.SIGINT)

DEFAULT_CHECKPOINT = "checkpoints/last.pt"
DEFAULT_DATA_DIR = "data"
MAX_INT = 2**31 - 1  # far above any sensible size, and safe for every tensor index
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts
# With --resume, these flags change the run from the next epoch on; every other recipe flag
# must match the checkpoint's recipe (README, "Interrupted? Resume").
HONOURED_ON_RESUME = ("epochs", "lr", "compile")
# With --evaluate, the checkpoint's recipe builds the model; only these flags apply.
HONOURED_ON_EVALUATE = ("test_batch_size", "limit_test")


def positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_INT:,}, got {text}")
    return value


def seed_int(text: str) -> int:
    value = int(text)
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {text}")
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


def width_float(text: str) -> float:
    value = positive_float(text)
    if value > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WIDTH:g}, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Recipe flags default to None, so a flag the user gave can be told from a default (a
    resume honours or refuses it); recipe_from fills in utils.RECIPE."""
    r = utils.RECIPE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=positive_int,
                   help=f"total epochs to train (default: {r['epochs']})")
    p.add_argument("--batch-size", type=positive_int, help=f"(default: {r['batch_size']})")
    p.add_argument("--test-batch-size", type=positive_int,
                   help=f"(default: {r['test_batch_size']})")
    p.add_argument("--lr", type=positive_float, help=f"(default: {r['lr']})")
    p.add_argument("--momentum", type=non_negative_float, help=f"(default: {r['momentum']})")
    p.add_argument("--step-size", type=positive_int,
                   help=f"StepLR: epochs between learning-rate drops (default: {r['step_size']})")
    p.add_argument("--gamma", type=positive_float,
                   help=f"StepLR: factor of each drop (default: {r['gamma']})")
    p.add_argument("--seed", type=seed_int, help=f"(default: {r['seed']})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--loader", choices=["fast", "torchvision"],
                   help="fast: data kept and augmented on the device, and the model run with "
                        "fused ReLU-dropout (plus, on the CPU, channels-last memory and "
                        "keep_freed_memory); see devices.fast_path. torchvision: the original "
                        f"per-sample pipeline and model (default: {r['loader']})")
    p.add_argument("--dropout-plan", choices=list(DROPOUT_PLANS),
                   help="blocks followed by dropout: table = conv1 and conv2, as the original's "
                        "table; every = every 3x3 block; none "
                        f"(default: {r['dropout_plan']})")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction,
                   help="BatchNorm after each conv but the last; --no-batch-norm (ablation) "
                        "removes it and gives every conv a bias (default: on)")
    p.add_argument("--transitions", choices=list(TRANSITIONS),
                   help="the two 1x1 reductions: bn-relu = Conv-BN-ReLU, as the table; "
                        f"bare = a plain 1x1 conv (ablation) (default: {r['transitions']})")
    p.add_argument("--head", choices=list(HEADS),
                   help="conv = the table's 3x3 conv6 from 3x3 to 1x1; gap = global average "
                        f"pooling, then a 1x1 conv to 10 classes (default: {r['head']})")
    p.add_argument("--width", type=width_float,
                   help="multiply every channel count by this, rounded to the nearest integer "
                        f"(the width sweep; default: {r['width']:g})")
    p.add_argument("--augmentation", choices=list(AUGMENTATIONS),
                   help="both = the original's 10%% crop-resize and ±15° rotation; rotate or "
                        f"crop = only one of them; none (ablation) (default: {r['augmentation']})")
    p.add_argument("--compile", action="store_true", default=None,
                   help="train through torch.compile (needs a C++ compiler on the CPU; not on "
                        "MPS)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels and no TF32 on CUDA (slower); the CPU is "
                        "deterministic for a given thread count anyway")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--refetch", action="store_true",
                   help="replace MNIST files that fail their checks")
    p.add_argument("--limit-train", type=positive_int,
                   help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, help="use only the first N test images")
    p.add_argument("--dry-run", action="store_true",
                   help="one training batch and one test batch, to check the set-up; "
                        "writes no checkpoint")
    p.add_argument("--save-model", metavar="PATH", default=None,
                   help=f"checkpoint written after every epoch (default: {DEFAULT_CHECKPOINT}, "
                        "or the --resume file)")
    p.add_argument("--no-save", action="store_true", help="write no checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace an existing checkpoint of another run at the --save-model path")
    p.add_argument("--resume", metavar="PATH",
                   help="continue the run saved in this checkpoint; only --epochs, --lr and "
                        "--compile may change it")
    p.add_argument("--evaluate", metavar="PATH",
                   help="score a checkpoint on the test set, then exit")
    p.add_argument("--metrics", metavar="PATH", help="write the run's history and facts as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    stop_on_signals()
    status = Status()
    try:
        args, device = parse_args(argv)
        status.data_dir = args.data_dir
        return execute(args, device, status)
    except KeyboardInterrupt as err:
        return report_interrupt(err, status)


def execute(args: argparse.Namespace, device: torch.device, status: Status) -> int:
    checkpoint = None
    if args.resume or args.evaluate:
        status.doing = "reading the checkpoint"
        try:
            checkpoint = checkpoints.load_checkpoint(args.resume or args.evaluate)
        except checkpoints.CheckpointError as err:
            return error(str(err))
    try:
        if args.evaluate:
            recipe = evaluation_recipe(args, checkpoint)
        else:
            recipe = resume_recipe(args, checkpoint) if checkpoint else recipe_from(args)
    except UsageError as err:
        build_parser().error(str(err))
    status.doing = "getting MNIST"
    try:
        mnist_files.ensure_mnist(args.data_dir, refetch=args.refetch, verbose=not args.quiet)
    except (mnist_files.DataFileError, mnist_files.MnistUnavailable) as err:
        return error(str(err))
    if args.evaluate:
        status.doing = "evaluating"
        return score_checkpoint(args, device, checkpoint["model"], recipe)
    return run_training(args, device, status, recipe, checkpoint)


# ---------------------------------------------------------------------------------------------
# Checks of every flag and path, before any work: each failure is a one-line usage error.
# ---------------------------------------------------------------------------------------------
def check_writable_dir(parser: argparse.ArgumentParser, path: Path, what: str) -> None:
    """Fail early, as a usage error, rather than after an epoch of training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        parser.error(f"{what} {path} is not writable: {err.strerror or err}")


def check_output_file(parser: argparse.ArgumentParser, path: str, flag: str) -> None:
    """An output must be a file path in a writable folder: found now, not after training."""
    if path.endswith(("/", os.sep)) or Path(path).is_dir():
        parser.error(f"{flag} {path} is a folder; give a file path, such as "
                     f"{os.path.join(path, 'last.pt' if flag == '--save-model' else 'out.json')}")
    check_writable_dir(parser, Path(path).resolve().parent, f"the folder of {flag}")


def check_data_dir(parser: argparse.ArgumentParser, data_dir: str) -> None:
    """The data folder needs to be writable only when a file must be fetched."""
    try:
        mnist_files.check_folders(data_dir)
    except mnist_files.DataFileError as err:
        parser.error(str(err))
    if mnist_files.needs_fetch(data_dir):
        check_writable_dir(parser, Path(data_dir), "--data-dir")


def same_file(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def check_not_replacing(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A trained model is never overwritten by accident: only its own --resume or --force."""
    path = args.save_model
    if not path or args.force or not os.path.lexists(path) or same_file(path, args.resume):
        return
    parser.error(f"{path} already exists and would be replaced; resume it with "
                 f"`{resume_command(path, args.data_dir)}`, keep it with --save-model OTHER.pt, "
                 f"or replace it with --force")


def check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.evaluate and args.resume:
        parser.error("--evaluate and --resume exclude each other: score a checkpoint, "
                     "or continue its training")
    if args.dry_run and (args.resume or args.evaluate):
        parser.error("--dry-run checks a new run's set-up; it cannot be combined with "
                     "--resume or --evaluate")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_combinations(parser, args)
    try:
        device = devices.get_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.compile and device.type == "mps":
        parser.error("--compile is not supported on MPS here: train without it")
    check_data_dir(parser, args.data_dir)
    if args.no_save or args.dry_run or args.evaluate:
        args.save_model = None  # a dry run or an evaluation never writes a checkpoint
    elif args.save_model is None:
        args.save_model = args.resume or DEFAULT_CHECKPOINT
    if args.save_model:
        check_output_file(parser, args.save_model, "--save-model")
        check_not_replacing(parser, args)
    if args.metrics and not args.evaluate:
        check_output_file(parser, args.metrics, "--metrics")
    return args, device


def recipe_from(args: argparse.Namespace) -> dict:
    """The settings that define a run (the keys of utils.RECIPE), from the flags given and
    RECIPE's defaults; a checkpoint carries them, so a resume repeats them."""
    given = {key: getattr(args, key, None) for key in utils.RECIPE}
    return utils.full_recipe({k: v for k, v in given.items() if v is not None})


class UsageError(ValueError):
    """A flag that contradicts the checkpoint it is given with."""


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def refuse_ignored_flags(args: argparse.Namespace, saved: dict, honoured: tuple[str, ...],
                         mode: str, remedy: str) -> None:
    """Recipe flags given that differ from a checkpoint's recipe and are not `honoured` would
    be ignored without a word: refuse them, saying what `mode` does and what to do instead."""
    ignored = "; ".join(f"{flag(k)} {getattr(args, k)} (saved: {saved[k]})" for k in utils.RECIPE
                        if k not in honoured and getattr(args, k, None) is not None
                        and getattr(args, k) != saved[k])
    if ignored:
        raise UsageError(f"{mode}, so {ignored} cannot apply: {remedy}")


def resume_recipe(args: argparse.Namespace, checkpoint: dict) -> dict:
    """The checkpoint's recipe, with the flags a resume honours."""
    recipe = dict(checkpoint["recipe"])
    refuse_ignored_flags(args, recipe, HONOURED_ON_RESUME, "--resume continues the saved recipe",
                         "drop them, or start a new run with --save-model NEW.pt "
                         "(only --epochs, --lr and --compile may change on resume)")
    done = len(checkpoint["history"]["epoch"])
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    if recipe["epochs"] <= done:
        raise UsageError(f"{args.resume} already holds {done} epochs of {recipe['epochs']}: "
                         f"give --epochs more than {done} to train further, "
                         f"or score it with --evaluate")
    if args.compile:
        recipe["compile"] = True
    return recipe


def evaluation_recipe(args: argparse.Namespace, checkpoint: dict) -> dict:
    """The checkpoint's own recipe (its model, its loader), with the test set's size and
    batch size from the flags."""
    recipe = dict(checkpoint["recipe"])
    refuse_ignored_flags(args, recipe, HONOURED_ON_EVALUATE,
                         "--evaluate scores the saved model with its own recipe",
                         "drop them (only --test-batch-size and --limit-test apply to an "
                         "evaluation)")
    return {**recipe, "test_batch_size": args.test_batch_size or utils.RECIPE["test_batch_size"],
            "limit_test": args.limit_test}


# ---------------------------------------------------------------------------------------------
# What is on disk: every message about a saved epoch is checked against the file itself.
# ---------------------------------------------------------------------------------------------
def resume_command(path: str, data_dir: str) -> str:
    """A command that can be pasted as it is: quoted, and with the run's data folder."""
    words = ["python", "train.py", "--resume", path]
    if data_dir != DEFAULT_DATA_DIR:
        words += ["--data-dir", data_dir]
    return shlex.join(words)


@dataclass
class Status:
    """What the run is doing, and which checkpoint epochs it may have completed on disk."""

    doing: str = "starting"
    data_dir: str = DEFAULT_DATA_DIR
    # path -> the epoch counts that file may hold from this run (a save may be cut short)
    candidates: dict[str, set[int]] = field(default_factory=dict)

    def expect(self, path: str | None, epochs: int) -> None:
        if path and epochs:
            self.candidates.setdefault(path, set()).add(epochs)

    def saved(self) -> tuple[str, int] | None:
        """The newest complete checkpoint of this run: (path, epochs), or None."""
        best = None
        for path, epochs in self.candidates.items():
            try:
                n = len(checkpoints.load_checkpoint(path)["history"]["epoch"])
            except checkpoints.CheckpointError:
                continue
            if n in epochs and (best is None or n > best[1]):
                best = (path, n)
        return best

    def report(self, no_epoch: str) -> str:
        found = self.saved()
        if found is None:
            return no_epoch
        path, n = found
        return (f"epoch {n} is saved in {path}; continue with:\n"
                f"  {resume_command(path, self.data_dir)}")


class Stopped(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), handled as Ctrl-C: the same clean stop and the same report."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def report_interrupt(err: KeyboardInterrupt, status: Status) -> int:
    """Say what stopped the run and which epoch is on disk; a second Ctrl-C while this checks
    the file would only turn the report into a traceback, so it is ignored meanwhile."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\ninterrupted ({name}) while {status.doing}.", file=sys.stderr)
        print(status.report("no complete epoch was saved."), file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 + signum


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------
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

    return {"model": {"channels": list(model.channels), **utils.net_options(recipe)},
            # the fast loader's pixels are the original's (PIL's arithmetic); older runs
            # of this project resampled bilinearly
            "augmentation_pixels": "pil-exact",
            "commit": git_commit(),
            "parameters": count_parameters(model), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__}


def start_run(args: argparse.Namespace, device: torch.device, status: Status, recipe: dict,
              checkpoint: dict | None) -> utils.Run:
    """The Run, restored from the checkpoint and with a new --lr when resuming."""
    if args.dry_run:
        recipe.update(epochs=1, limit_train=recipe["batch_size"],
                      limit_test=recipe["test_batch_size"])
        print("dry run: one batch each way; no checkpoint is written")
    if args.save_model:
        for leftover in checkpoints.remove_partial_saves(args.save_model):
            print(f"removed {leftover}, left by a save that was killed")
    status.doing = "loading the data"
    run = utils.Run(recipe, device, args.data_dir)
    if checkpoint is not None:
        checkpoints.restore_run(run, checkpoint)
        done = len(run.history["epoch"])
        status.expect(args.resume, done)
        print(f"resuming {args.resume} after epoch {done} of {recipe['epochs']}")
        if args.lr is not None:
            for group in run.optimizer.param_groups:
                group["lr"] = args.lr
            print(f"learning rate set to {args.lr:g} from epoch {done + 1} "
                  f"(later StepLR drops apply to it)")
    return run


def run_training(args: argparse.Namespace, device: torch.device, status: Status, recipe: dict,
          checkpoint: dict | None) -> int:
    run = start_run(args, device, status, recipe, checkpoint)
    print(f"device: {device} | loader: {recipe['loader']} | "
          f"parameters: {count_parameters(run.model):,}")

    def save(history: dict) -> None:
        status.doing = f"saving epoch {len(history['epoch'])}"
        if args.save_model:
            status.expect(args.save_model, len(history["epoch"]))
            checkpoints.save_run(run, args.save_model)
        status.doing = f"training epoch {len(history['epoch']) + 1}"

    status.doing = f"training epoch {len(run.history['epoch']) + 1}"
    try:
        run.fit(on_epoch_end=save, progress=not args.quiet)
    except utils.NonFiniteLoss as err:
        return report_divergence(err, run, status)
    except OSError as err:
        return error(f"could not write the checkpoint {args.save_model}: "
                     f"{err.strerror or err}. {status.report('no complete epoch was saved.')}")
    if args.metrics:
        status.doing = "writing --metrics"
        try:
            write_metrics(args.metrics, run, run.recipe, device)
        except OSError as err:
            return error(f"could not write --metrics {args.metrics}: {err.strerror or err}. "
                         f"{status.report('no checkpoint of this run is on disk.')}")
    final, epochs = run.history["test_acc"][-1], len(run.history["epoch"])
    print(f"final test accuracy: {final:.2f}% after {epochs} epoch{'' if epochs == 1 else 's'}")
    return 0


def report_divergence(err: utils.NonFiniteLoss, run: utils.Run, status: Status) -> int:
    """Point to a checkpoint only after load_checkpoint found it whole and finite."""
    lr = run.optimizer.param_groups[0]["lr"]
    found = status.saved()
    if found is None:
        advice = f"no good epoch was saved; start again with a smaller --lr (say {lr / 10:g})"
    else:
        path, n = found
        command = resume_command(path, status.data_dir) + f" --lr {lr / 10:g}"
        advice = (f"the last good checkpoint (epoch {n}) is {path}; continue it with a smaller "
                  f"learning rate: {command}")
    return error(f"{err}; stopped. {advice}")


def write_metrics(path: str, run: utils.Run, recipe: dict, device: torch.device) -> None:
    out = {"recipe": recipe, **run_facts(device, run.model, recipe), "history": run.history,
           "final_test_acc": run.history["test_acc"][-1],
           "best_test_acc": max(run.history["test_acc"])}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def score_checkpoint(args: argparse.Namespace, device: torch.device, weights: dict,
                        recipe: dict) -> int:
    """Score saved weights on --limit-test images (default: the whole test set)."""
    model = utils.build_model(recipe, device)
    model.load_state_dict(weights)
    _, test_loader = utils.make_loaders(recipe, args.data_dir, device)
    loss, acc = utils.evaluate(model, test_loader, device)
    print(f"{args.evaluate}: test loss {loss:.4f}, accuracy {acc:.2f}% "
          f"on {len(test_loader.dataset):,} images")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
