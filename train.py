"""Train the S6 MNIST model from a terminal: the notebook's recipe, without the notebook.

    python train.py                                  # the original recipe: 20 epochs, seed 1
    python train.py --resume checkpoints/last.pt     # continue an interrupted run
    python train.py --evaluate checkpoints/last.pt   # score a saved model on the test set
    python train.py --head gap --width 0.7           # a variant (README, "What each part buys")
    python train.py --help                           # every flag

Flags follow pytorch/examples' mnist/main.py. A checkpoint is written after every epoch. Every
flag and path is checked before any work starts (outputs.py's policy: no output replaces a file
that is not its own without `--force`), one run at a time trains into a checkpoint, and every
message about what was saved is checked against the file on disk. A failure a user can cause
or meet is one line (failures.py recognises them); a bug keeps its traceback.
Read top to bottom: the flags, `main` and its error boundary, the checks of flags and paths,
resume and evaluate, and the run itself; stopping.py says what a run that stops early says.
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
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch

import utils
from model import DROPOUT_PLANS, HEADS, MAX_WIDTH, TRANSITIONS, count_parameters
from support import checkpoints, devices, failures, metrics, mnist_files, outputs, stopping
from support.augment import AUGMENTATIONS
from support.checkpoints import epochs_text
from support.recipe import COMPACT, MODELS, SCHEDULES, foreign_options
from support.stopping import flag

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if _ctrl_c_while_starting:
    print("\ninterrupted (Ctrl-C) while starting; nothing was trained or saved.",
          file=sys.stderr)
    sys.exit(128 + signal.SIGINT)

DEFAULT_CHECKPOINT = "checkpoints/last.pt"
DEFAULT_DATA_DIR = "data"
MAX_INT = 2**31 - 1  # far above any sensible size, and safe for every tensor index
MAX_THREADS = 1024  # more than any machine here has cores; each thread costs memory
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts
# With --resume, these flags change the run from the next epoch on; every other recipe flag
# must match the checkpoint's recipe (README, "Interrupted? Resume").
HONOURED_ON_RESUME = ("epochs", "lr", "compile")
# With --evaluate, the checkpoint's recipe builds the model; only these flags apply.
HONOURED_ON_EVALUATE = ("test_batch_size", "limit_test")


def positive_int(text: str, most: int = MAX_INT) -> int:
    value = int(text)
    if not 0 < value <= most:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {most:,}, got {text}")
    return value


def threads_int(text: str) -> int:
    return positive_int(text, MAX_THREADS)


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


def dropout_float(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1 (1 drops everything), got {text}")
    return value


def path_text(text: str) -> str:
    """An empty path would mean the current folder, or no flag at all (`--evaluate ""` used
    to start a training): refused."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    """Recipe flags default to None, so a flag the user gave can be told from a default (a
    resume honours or refuses it); recipe_from fills in utils.RECIPE."""
    r = utils.RECIPE
    p = argparse.ArgumentParser(prog=stopping.PROG, description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=positive_int,
                   help=f"total epochs to train (default: {r['epochs']}; compact: "
                        f"{COMPACT['epochs']})")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"training images per SGD step (default: {r['batch_size']})")
    p.add_argument("--test-batch-size", type=positive_int,
                   help=f"test images per forward pass (default: {r['test_batch_size']})")
    p.add_argument("--lr", type=positive_float,
                   help=f"SGD's learning rate, OneCycle's peak with --schedule onecycle "
                        f"(default: {r['lr']}; compact: {COMPACT['lr']})")
    p.add_argument("--momentum", type=non_negative_float,
                   help=f"SGD's momentum (default: {r['momentum']})")
    p.add_argument("--step-size", type=positive_int,
                   help=f"StepLR: epochs between learning-rate drops (default: {r['step_size']})")
    p.add_argument("--gamma", type=positive_float,
                   help=f"StepLR: factor of each drop (default: {r['gamma']})")
    p.add_argument("--seed", type=seed_int,
                   help="fixes the weights, the shuffling, the augmentation and the dropout "
                        f"masks (default: {r['seed']})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to train: auto picks cuda, then mps, then cpu (default: auto)")
    p.add_argument("--threads", type=threads_int,
                   help="CPU threads for torch (torch.set_num_threads; default: torch's own, "
                        "one per core). The README's timings and histories depend on it: on "
                        "the CPU another thread count gives other last digits")
    p.add_argument("--model", choices=list(MODELS),
                   help="s6 = the write-up's Net; compact = CompactNet (7,594 parameters), "
                        "whose named recipe (support/recipe.py COMPACT) then fills in every "
                        f"recipe flag not given (default: {r['model']})")
    p.add_argument("--schedule", choices=list(SCHEDULES),
                   help="step = StepLR (--step-size, --gamma); onecycle = OneCycleLR peaking at "
                        f"--lr, stepped once per epoch (default: {r['schedule']}; compact: "
                        f"{COMPACT['schedule']})")
    p.add_argument("--dropout", type=dropout_float,
                   help="probability of each dropout layer in the model "
                        f"(default: {r['dropout']:g}; compact: {COMPACT['dropout']:g})")
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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="train through torch.compile (needs a C++ compiler on the CPU; not on "
                        "MPS); on --resume, --no-compile continues a compiled run without it "
                        "(default: off, or the checkpoint's)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels and no TF32 on CUDA (slower); the CPU is "
                        "deterministic for a given thread count anyway")
    p.add_argument("--data-dir", type=path_text, default=DEFAULT_DATA_DIR,
                   help="folder that holds MNIST/raw; the files are fetched into it when "
                        f"missing (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--refetch", action="store_true",
                   help="replace MNIST files that fail their checks")
    p.add_argument("--limit-train", type=positive_int,
                   help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, help="use only the first N test images")
    p.add_argument("--dry-run", action="store_true",
                   help="one training batch and one test batch, to check the set-up; "
                        "writes no checkpoint")
    p.add_argument("--save-model", metavar="PATH", type=path_text,
                   help=f"checkpoint written after every epoch (default: {DEFAULT_CHECKPOINT}, "
                        "or the --resume file)")
    p.add_argument("--no-save", action="store_true", help="write no checkpoint")
    p.add_argument("--force", action="store_true",
                   help="let --save-model or --metrics replace an existing file that is not "
                        "this run's own")
    p.add_argument("--resume", metavar="PATH", type=path_text,
                   help="continue the run saved in this checkpoint; only --epochs, --lr and "
                        "--compile may change it")
    p.add_argument("--evaluate", metavar="PATH", type=path_text,
                   help="score a checkpoint on the test set, then exit; writes nothing")
    p.add_argument("--metrics", metavar="PATH", type=path_text,
                   help="write the run's history and facts as JSON (replaces an earlier "
                        "metrics file of train.py; any other file only with --force)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (bars are shown only when stderr is a terminal)")
    return p


# ---------------------------------------------------------------------------------------------
# main, and its error boundary: every failure a user can cause or meet is one line.
# ---------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A flag or path refused after parsing: one line, exit 2 (see `refuse`)."""


def refuse(message: str) -> NoReturn:
    """A usage error in argparse's form and exit code, without its 13-line usage block: that
    block helps with a malformed flag (argparse's own errors keep it), not with a refusal."""
    print(f"{stopping.PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None, then_exit: bool = False) -> int:
    """The command; `then_exit` when the process ends after it (stopping_on_signals)."""
    line_buffered()
    status = stopping.Status()
    with stopping.stopping_on_signals(then_exit):
        try:
            args, device = parse_args(argv)
            if args.data_dir != DEFAULT_DATA_DIR:
                status.data_dir = args.data_dir
            status.evaluating = bool(args.evaluate)
            with checkpoint_held(args):
                check_replacements(args)
                return execute(args, device, status)
        except KeyboardInterrupt as err:
            return stopping.report_interrupt(err, status)
        except UsageError as err:
            refuse(str(err))
        except BrokenPipeError:
            return stopping.stop_quietly(status)
        except Exception as err:
            message = stopping.failure_message(err, status)
            if message is None:
                raise  # a bug: its traceback is what a fix needs
            return error(message)


def line_buffered() -> None:
    """Each line reaches a pipe or a file when it is printed (`| tee log`, `> log` followed
    with tail -f): Python buffers a redirected stdout in 8 KB blocks otherwise."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def execute(args: argparse.Namespace, device: torch.device, status: stopping.Status) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = None
    if args.resume or args.evaluate:
        status.doing = "reading the checkpoint"
        checkpoint = checkpoints.load_checkpoint(args.resume or args.evaluate)
    if args.evaluate:
        recipe = evaluation_recipe(args, checkpoint)
    else:
        recipe = resume_recipe(args, checkpoint) if checkpoint else recipe_from(args)
    if recipe["compile"] and device.type == "mps":
        raise UsageError("--compile is not supported on MPS here: "
                         + ("resume with --no-compile" if args.resume else "train without it"))
    status.recipe = recipe
    status.doing = "getting MNIST"
    mnist_files.ensure_mnist(args.data_dir, refetch=args.refetch, verbose=not args.quiet)
    if args.evaluate:
        status.doing = "evaluating"
        return score_checkpoint(args, device, checkpoint["model"], recipe)
    return run_training(args, device, status, recipe, checkpoint)


# ---------------------------------------------------------------------------------------------
# Checks of every flag and path, before any work: each failure is a one-line usage error.
# ---------------------------------------------------------------------------------------------
def check_writable_dir(path: Path, what: str) -> None:
    """Fail early, as a usage error, rather than after an epoch of training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{what} {path} is not writable: {err.strerror or err}") from None


def check_data_dir(data_dir: str) -> None:
    """The data folder needs to be writable only when a file must be fetched."""
    try:
        mnist_files.check_folders(data_dir)
        fetch = mnist_files.needs_fetch(data_dir)
    except mnist_files.DataFileError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"--data-dir {data_dir}: {err.strerror or err}") from None
    if fetch:
        check_writable_dir(Path(data_dir), "--data-dir")


def check_input(flag_name: str, path: str | None) -> None:
    """A path that cannot even be looked at (a name too long, a loop of links) is a usage
    error; a missing or damaged file is load_checkpoint's to explain."""
    if path is None:
        return
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as err:
        raise UsageError(f"{flag_name} {path}: {err.strerror or err}") from None


def planned_outputs(args: argparse.Namespace) -> dict[str, str]:
    """The files this run writes, by the flag that names them (a resume saves to its own)."""
    checkpoint = "--resume" if args.resume and same_file(args.resume, args.save_model) else (
        "--save-model")
    return {name: path for name, path in ((checkpoint, args.save_model),
                                          ("--metrics", args.metrics)) if path}


def inputs(args: argparse.Namespace) -> dict[str, str]:
    """The files this run reads, by what they are; a --resume checkpoint saved to again is
    the one input an output may be."""
    found = {f"the MNIST file {name}": str(mnist_files.raw_dir(args.data_dir) / name)
             for name in mnist_files.MNIST_FILES}
    if args.evaluate:
        found["the --evaluate checkpoint"] = args.evaluate
    if args.resume and not same_file(args.resume, args.save_model):
        found["the --resume checkpoint"] = args.resume
    return found


def check_paths(args: argparse.Namespace) -> None:
    """outputs.py's policy, up to what needs the lock: every output a writable file, none an
    input, no two the same."""
    check_input("--resume", args.resume)
    check_input("--evaluate", args.evaluate)
    planned = planned_outputs(args)
    try:
        for name, path in planned.items():
            outputs.check_writable(name, path, "out.json" if name == "--metrics" else "last.pt")
        outputs.check_distinct(planned, inputs(args))
    except outputs.Refused as err:
        raise UsageError(str(err)) from None


def same_file(a: str, b: str | None) -> bool:
    return b is not None and outputs.target(a) == outputs.target(b)


def check_replacements(args: argparse.Namespace) -> None:
    """No existing file is replaced unless it is the run's own: the checkpoint it resumes,
    or a metrics file of train.py; --force replaces any. Checked while the lock is held."""
    if args.force:
        return
    if args.save_model and outputs.would_replace(args.save_model,
                                                 lambda file: same_file(file, args.resume)):
        raise UsageError(existing_checkpoint(args.save_model, args.data_dir))
    if args.metrics and outputs.would_replace(args.metrics, metrics.is_metrics_file):
        raise UsageError(f"--metrics {args.metrics} already exists and is not a metrics file of "
                         f"train.py, so it is kept: choose another path, or replace it with "
                         f"--force")


def existing_checkpoint(path: str, data_dir: str) -> str:
    """Why --save-model PATH is refused, and what to do: resume the run (or train it further,
    or score it, if it is finished), keep it, or replace it."""
    keep = "keep it with --save-model OTHER.pt, or replace it with --force"
    try:
        saved = checkpoints.load_checkpoint(path)
    except checkpoints.CheckpointError:
        return f"{path} already exists and is not a checkpoint of this model: {keep}"
    done, total = len(saved["history"]["epoch"]), saved["recipe"]["epochs"]
    data_dir = None if data_dir == DEFAULT_DATA_DIR else data_dir
    resume = stopping.resume_command(path, data_dir)
    if done < total:
        return (f"{path} already exists and holds {epochs_text(done)} of {total}; resume it with "
                f"`{resume}`, {keep}")
    return (f"{path} already exists and holds a finished run ({epochs_text(done)} of {total}); "
            f"train it further with `{resume} --epochs {done + 5}`, score it with "
            f"`{stopping.checkpoint_command('--evaluate', path, data_dir)}`, {keep}")


def check_combinations(args: argparse.Namespace) -> None:
    if args.evaluate and args.resume:
        raise UsageError("--evaluate and --resume exclude each other: score a checkpoint, "
                         "or continue its training")
    if args.dry_run and (args.resume or args.evaluate):
        raise UsageError("--dry-run checks a new run's set-up; it cannot be combined with "
                         "--resume or --evaluate")
    writing = [flag for flag, given in (("--save-model", args.save_model),
                                        ("--metrics", args.metrics), ("--force", args.force))
               if given]
    if args.evaluate and writing:
        raise UsageError(f"--evaluate prints its score and writes no file: drop "
                         f"{' and '.join(writing)}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    """The flags, checked: argparse's own errors for a malformed flag, a one-line `refuse`
    (SystemExit 2) for everything after."""
    args = build_parser().parse_args(argv)
    try:
        check_combinations(args)
        try:
            device = devices.get_device(args.device)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if args.compile and device.type == "mps":
            raise UsageError("--compile is not supported on MPS here: train without it")
        check_data_dir(args.data_dir)
        if args.no_save or args.dry_run or args.evaluate:
            args.save_model = None  # a dry run or an evaluation never writes a checkpoint
        elif args.save_model is None:
            args.save_model = args.resume or DEFAULT_CHECKPOINT
        check_paths(args)
    except UsageError as err:
        refuse(str(err))
    return args, device


@contextmanager
def checkpoint_held(args: argparse.Namespace) -> Iterator[None]:
    """The --save-model checkpoint's lock for the whole run (checkpoints.checkpoint_lock)."""
    if not args.save_model:
        yield
        return
    with checkpoints.checkpoint_lock(args.save_model) as removed:
        for leftover in removed:
            print(f"removed {leftover}, left by a save that was killed")
        yield


def recipe_from(args: argparse.Namespace) -> dict:
    """The settings that define a run (the keys of utils.RECIPE), from the flags given and
    RECIPE's defaults; a checkpoint carries them, so a resume repeats them."""
    given = {key: getattr(args, key, None) for key in utils.RECIPE}
    recipe = utils.full_recipe({k: v for k, v in given.items() if v is not None})
    foreign = foreign_options(recipe)
    if foreign:
        verb, them = ("applies", "it") if len(foreign) == 1 else ("apply", "them")
        raise UsageError(f"{' and '.join(flag(k) for k in foreign)} {verb} to the s6 model "
                         f"only, not to --model {recipe['model']}: drop {them}")
    return recipe


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
    changed = [flag(k) for k in ("epochs", "lr") if getattr(args, k) not in (None, recipe[k])]
    if recipe["schedule"] == "onecycle" and changed:
        raise UsageError(f"{args.resume} follows a OneCycle schedule fixed by its epochs and "
                         f"peak lr when it started, so {' and '.join(changed)} cannot change it: "
                         f"drop them, or start a new run with --save-model NEW.pt")
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    if recipe["epochs"] <= done:
        raise UsageError(f"{args.resume} already holds {epochs_text(done)} of {recipe['epochs']}: "
                         f"give --epochs more than {done} to train further, "
                         f"or score it with --evaluate")
    if args.compile is not None:
        recipe["compile"] = args.compile
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
# The run.
# ---------------------------------------------------------------------------------------------
def start_run(args: argparse.Namespace, device: torch.device, status: stopping.Status,
              recipe: dict, checkpoint: dict | None) -> utils.Run:
    """The run, built as the notebook's training cell builds it (utils.build_run), restored
    from the checkpoint and with a new --lr when resuming."""
    if args.dry_run:
        recipe.update(epochs=1, limit_train=recipe["batch_size"],
                      limit_test=recipe["test_batch_size"])
        print("dry run: one batch each way; no checkpoint is written")
    status.doing = "loading the data"
    run = utils.build_run(recipe, device, args.data_dir)
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


def run_training(args: argparse.Namespace, device: torch.device, status: stopping.Status,
                 recipe: dict, checkpoint: dict | None) -> int:
    run = start_run(args, device, status, recipe, checkpoint)
    # The code this run starts from, whatever is committed while it trains.
    commit = metrics.git_commit() if args.metrics else None
    print(f"device: {device} | loader: {recipe['loader']} | "
          f"parameters: {count_parameters(run.model):,}")
    last_saved = len(run.history["epoch"])

    def save(history: dict) -> None:
        nonlocal last_saved
        n = len(history["epoch"])
        status.doing = f"saving epoch {n}"
        if args.save_model:
            status.expect(args.save_model, n)
            failures.written(f"save epoch {n} in {args.save_model}",
                             lambda: checkpoints.save_run(run, outputs.target(args.save_model)))
        last_saved = n
        status.doing = f"training epoch {n + 1}"

    status.doing = f"training epoch {len(run.history['epoch']) + 1}"
    try:
        # Bars only on a terminal: a redirected log gets one line per epoch, not every refresh.
        utils.fit(run, on_epoch_end=save, progress=sys.stderr.isatty() and not args.quiet)
    except utils.NonFiniteLoss as err:
        return error(stopping.report_divergence(err, run.optimizer.param_groups[0]["lr"], status))
    except BrokenPipeError:
        if len(run.history["epoch"]) > last_saved:
            save(run.history)  # the epoch whose line could not be printed is whole: keep it
        raise
    if args.metrics:
        status.doing = "writing --metrics"
        failures.written(f"write --metrics {args.metrics}",
                         lambda: metrics.write_metrics(args.metrics, run, device, commit))
    print(final_line(args, run.history))
    return 0


def final_line(args: argparse.Namespace, history: dict) -> str:
    """The final accuracy first (tests and the README read it), then the best epoch and
    where the run is kept."""
    acc, n = history["test_acc"], len(history["epoch"])
    best = max(range(n), key=lambda i: acc[i])  # the first epoch of the best accuracy
    kept = (f"checkpoint: {args.save_model}" if args.save_model else
            f"no checkpoint ({'--dry-run' if args.dry_run else '--no-save'})")
    if args.metrics:
        kept += f"; metrics: {args.metrics}"
    return (f"final test accuracy: {acc[-1]:.2f}% after {epochs_text(n)} "
            f"(best {acc[best]:.2f}% at epoch {history['epoch'][best]}); {kept}")


def score_checkpoint(args: argparse.Namespace, device: torch.device, weights: dict,
                     recipe: dict) -> int:
    """Score saved weights on --limit-test images (default: the whole test set)."""
    model = utils.prepare_model(utils.make_model(recipe), recipe, device)
    model.load_state_dict(weights)
    _, test_loader = utils.make_loaders(recipe, args.data_dir, device)
    loss, acc = utils.test(model, device, test_loader, progress=False)
    print(f"{args.evaluate}: test loss {loss:.4f}, accuracy {acc:.2f}% "
          f"on {len(test_loader.dataset):,} images")
    return 0


if __name__ == "__main__":
    sys.exit(main(then_exit=True))
