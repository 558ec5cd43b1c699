"""Train the S6 MNIST model from a terminal: the notebook's recipe, without the notebook.

    python train.py                                  # the original recipe: 20 epochs, seed 1
    python train.py --resume checkpoints/last.pt     # continue an interrupted run
    python train.py --evaluate checkpoints/last.pt   # score a saved model on the test set
    python train.py --head gap --width 0.7           # a variant (README, "What each part buys")
    python train.py --help                           # every flag

Flags follow pytorch/examples' mnist/main.py. A checkpoint is written after every epoch. Every
flag and path is checked before any work starts (no output replaces a file that is not its own
without `--force`), one run at a time trains into a checkpoint, and every message about what
was saved is checked against the file on disk. A failure a user can cause or meet is one line;
a bug keeps its traceback. Read top to bottom: the flags, `main`, then the run; the machinery
behind them is in support/command_line.py (the flags, their checks, the commands a message suggests)
and support/stopping.py (signals, failures and what they say).
"""

from __future__ import annotations

import signal
import sys

# Loading torch takes seconds, and a Ctrl-C then is the user's choice, not a crash; raised
# inside an import, a KeyboardInterrupt can be swallowed by a library's bare `except`. So until
# the imports are done, Ctrl-C is only noted (unless it is ignored, as in a background job).
_pressed: list[int] = []
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, lambda signum, frame: _pressed.append(signum))

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import utils
from model import count_parameters
from support import checkpoints, command_line, metrics, outputs, stopping
from support.bookkeeping import (
    STDOUT,
    NonFiniteLoss,
    Progress,
    check_finite,
    epoch_line,
    final_line,
    history_rows,
)
from support.command_line import DEFAULT_CHECKPOINT, DEFAULT_DATA_DIR, RESUMABLE, UsageError
from support.devices import compiled, configure_process, fast_path, prepare_model
from support.fast_loader import DeviceLoader
from support.mnist_files import MNIST_FILES, TEST_FILES, ensure_mnist, load_mnist_tensors
from support.recipe import check_recipe, make_model, make_optimizer, steps_per_batch
from support.stopping import error, guarded
from support.torchvision_loader import torchvision_test_loader

if __name__ == "__main__":  # Ctrl-C raises again; one noted meanwhile stops here, in one line
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _pressed:
        print("\ninterrupted (Ctrl-C) while starting; nothing was trained or saved.",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


EXAMPLES = """examples:
  python train.py                                   # the write-up's 20-epoch run, seed 1
  python train.py --model speedrun                  # the laptop-CPU speedrun (docs/speedrun.md)
  python train.py --resume checkpoints/last.pt      # continue an interrupted run
  python train.py --evaluate checkpoints/last.pt    # score a saved model on the test set
"""


def build_parser() -> argparse.ArgumentParser:
    """The recipe's flags come from its fields (support/recipe.py), the rest are the run's."""
    p = argparse.ArgumentParser(prog=command_line.PROG, description=__doc__.splitlines()[0],
                                epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {"recipe": p.add_argument_group("recipe (saved in every checkpoint; a resume "
                                             "keeps it)"),
              "model variants": p.add_argument_group("model variants (the s6 model's "
                                                     "architecture; ablations)"),
              "data": p.add_argument_group("data")}
    out = p.add_argument_group("checkpoints and outputs")
    groups["run"] = run = p.add_argument_group("run")
    command_line.add_recipe_flags(groups)
    data = groups["data"]
    data.add_argument("--data-dir", type=command_line.path_text, default=DEFAULT_DATA_DIR,
                      help="folder that holds MNIST/raw; the files are fetched into it when "
                           f"missing (default: {DEFAULT_DATA_DIR})")
    data.add_argument("--refetch", action="store_true",
                      help="replace MNIST files that fail their checks")
    out.add_argument("--save-model", metavar="PATH", type=command_line.path_text,
                     help=f"checkpoint written after every epoch (default: {DEFAULT_CHECKPOINT}, "
                          "or the --resume file)")
    out.add_argument("--no-save", action="store_true", help="write no checkpoint")
    out.add_argument("--force", action="store_true",
                     help="let --save-model or --metrics replace an existing file that is not "
                          "this run's own")
    out.add_argument("--resume", metavar="PATH", type=command_line.path_text,
                     help=f"continue the run saved in this checkpoint; only "
                          f"{command_line.allowed('on_resume')} may change it (a OneCycle run: "
                          f"only --compile; docs/resume.md)")
    out.add_argument("--evaluate", metavar="PATH", type=command_line.path_text,
                     help="score a checkpoint on the test set, then exit; writes nothing")
    out.add_argument("--metrics", metavar="PATH", type=command_line.path_text,
                     help="write the run's history and facts as JSON (replaces an earlier "
                          "metrics file of train.py; any other file only with --force)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="where to train: auto picks cuda, then mps, then cpu (default: auto)")
    run.add_argument("--threads", type=command_line.value_type(command_line.THREADS),
                     help="CPU threads for torch (torch.set_num_threads; default: torch's own, "
                          "one per core). The README's timings and histories depend on it: on "
                          "the CPU another thread count gives other last digits")
    run.add_argument("--dry-run", action="store_true",
                     help="one training batch and one test batch, to check the set-up; "
                          "writes no checkpoint")
    run.add_argument("--quiet", action="store_true",
                     help="no progress bars (bars are shown only when stderr is a terminal)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    """The flags, checked (support/command_line.py): argparse's own errors for a malformed flag,
    a one-line refusal (SystemExit 2) for everything after."""
    args = build_parser().parse_args(argv)
    return args, command_line.check_flags(args)


# ---------------------------------------------------------------------------------------------
# main: check, then train, resume or evaluate.
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, then_exit: bool = False) -> int:
    """The command. Inside its error boundary (support/stopping.py) a failure a user can cause
    or meet ends in one line and an exit code, and a bug keeps its traceback; `then_exit` when
    the process ends after it (stopping_on_signals)."""
    status = stopping.Status(test=utils.test)

    def command() -> int:
        args, device = parse_args(argv)
        if args.data_dir != DEFAULT_DATA_DIR:
            status.data_dir = args.data_dir
        status.evaluating = bool(args.evaluate)
        with command_line.checkpoint_held(args):
            command_line.check_replacements(args)
            return execute(args, device, status)

    return guarded(command, status, then_exit)


def execute(args: argparse.Namespace, device: torch.device, status: stopping.Status) -> int:
    """Settle the recipe (the flags', or the checkpoint's), get MNIST, then train or score."""
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = None
    if args.resume or args.evaluate:
        status.doing = "reading the checkpoint"
        checkpoint = checkpoints.read_checkpoint(args.resume or args.evaluate)
    recipe = command_line.changed_recipe(args, checkpoint) if checkpoint else recipe_from(args)
    if recipe["compile"] and device.type == "mps":
        raise UsageError("--compile is not supported on MPS here: "
                         + ("resume with --no-compile" if args.resume else "train without it"))
    status.recipe = recipe
    if args.resume and len(checkpoint["history"]["epoch"]) >= recipe["epochs"]:
        return write_saved_metrics(args, device, status, checkpoint)  # what --metrics wrote
    status.doing = "getting MNIST"
    ensure_mnist(args.data_dir, refetch=args.refetch, verbose=not args.quiet,
                 files=TEST_FILES if args.evaluate else MNIST_FILES)
    if args.evaluate:
        status.doing = "evaluating"
        return score_checkpoint(args, device, checkpoint["model"], recipe)
    return run_training(args, device, status, recipe, checkpoint)


def recipe_from(args: argparse.Namespace) -> dict:
    """A new run's recipe: the named recipe of its --model, with the flags given."""
    return command_line.new_recipe(args).as_dict()


# ---------------------------------------------------------------------------------------------
# The run: built as the notebook's training cell builds it, trained by the same loop.
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the notebook's training cell builds from a recipe. `trained` is the module the loop
    trains: the model, or its torch.compile wrapper (a checkpoint keeps the model's keys)."""

    recipe: dict
    model: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    test_loader: Any
    device: torch.device
    history: list[dict] = field(default_factory=list)


def build_run(recipe: dict, device: torch.device, data_dir: str = DEFAULT_DATA_DIR) -> Run:
    """The notebook's training cell up to its loop (train.py, the benchmarks and the tests).
    Every value is checked first: a string lr or 0 epochs is refused, not failed on in torch."""
    recipe = check_recipe(recipe)
    torch.manual_seed(recipe["seed"])  # also seeds CUDA and MPS
    configure_process(recipe, device)  # the allocator and determinism: this process's
    model = prepare_model(make_model(recipe), recipe, device)
    optimizer, scheduler = make_optimizer(model, recipe)
    train_loader, test_loader = utils.get_loaders(recipe, data_dir, device)
    trained = compiled(model, device) if recipe["compile"] else model
    return Run(recipe, model, trained, optimizer, scheduler, train_loader, test_loader, device)


def fit(run: Run, on_epoch_end: Callable[[list[dict]], None] | None = None,
        progress: Progress = STDOUT, log: bool = True) -> list[dict]:
    """The notebook's epoch loop: train until the recipe's epochs are in the history (a
    restored run goes on), printing each epoch's line and calling `on_epoch_end` after it."""
    per_batch = steps_per_batch(run.recipe)  # then utils.train steps it, not this loop
    for epoch in range(len(run.history) + 1, run.recipe["epochs"] + 1):
        lr, start = run.optimizer.param_groups[0]["lr"], time.perf_counter()
        train_loss, train_acc = utils.train(run.trained, run.device, run.train_loader,
                                            run.optimizer, epoch, progress,
                                            run.scheduler if per_batch else None)
        test_loss, test_acc = utils.test(run.model, run.device, run.test_loader, epoch, progress)
        if not per_batch:
            run.scheduler.step()
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                   test_loss=test_loss, test_acc=test_acc, lr=lr,
                   seconds=time.perf_counter() - start)
        check_finite(run.model, row)  # a diverged epoch is neither recorded nor saved
        run.history.append(row)
        if log:
            tqdm.write(epoch_line(row))
        if on_epoch_end is not None:
            on_epoch_end(run.history)
    return run.history


def save_run(run: Run, path: str) -> None:
    """utils.save_checkpoint of the run as it stands (its epoch line is already printed)."""
    utils.save_checkpoint(path, run.trained, run.optimizer, run.scheduler, run.train_loader,
                          run.recipe, run.history, log=False)


def resume_run(run: Run, path: str, may_change: tuple[str, ...] = RESUMABLE) -> None:
    """utils.load_checkpoint into the run: its history, model, SGD, schedule and draws."""
    run.history = utils.load_checkpoint(path, run.trained, run.optimizer, run.scheduler,
                                        run.train_loader, run.recipe, may_change=may_change,
                                        notebook=False)


def start_run(args: argparse.Namespace, device: torch.device, status: stopping.Status,
              recipe: dict, checkpoint: dict | None) -> Run:
    """The run, built from the recipe and, when resuming, restored from the checkpoint; the
    recipe is the saved one with the flags that changed it (command_line.resume_recipe), and
    what a restore puts back from the file is set to it."""
    if args.dry_run:
        recipe.update(epochs=1, limit_train=recipe["batch_size"],
                      limit_test=recipe["test_batch_size"])
        print("dry run: one batch each way; no checkpoint is written")
    status.doing = "loading the data"
    run = build_run(recipe, device, args.data_dir)
    if checkpoint is not None:
        resume_run(run, args.resume)
        status.expect(args.resume, len(run.history))
        if recipe["lr"] != checkpoint["recipe"]["lr"]:
            set_lr(run, recipe["lr"])
    return run


def set_lr(run: Run, lr: float) -> None:
    """The learning rate from the next epoch on, as a fresh SGD and StepLR of `lr` hold it
    (so the next resume's checks find the recipe's rate); later StepLR drops apply to it."""
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
    run.scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
    print(f"learning rate set to {lr:g} from epoch {len(run.history) + 1} "
          f"(later StepLR drops apply to it)")


def run_training(args: argparse.Namespace, device: torch.device, status: stopping.Status,
                 recipe: dict, checkpoint: dict | None) -> int:
    run = start_run(args, device, status, recipe, checkpoint)
    # The code this run starts from, whatever is committed while it trains.
    commit = metrics.git_commit() if args.metrics else None
    print(f"device: {device} | loader: {recipe['loader']} | "
          f"parameters: {count_parameters(run.model):,}")
    last_saved = len(run.history)

    def save(history: list[dict]) -> None:
        nonlocal last_saved
        n = len(history)
        status.doing = f"saving epoch {n}"
        if args.save_model:
            status.expect(args.save_model, n)
            stopping.written(f"save epoch {n} in {args.save_model}",
                             lambda: save_run(run, outputs.target(args.save_model)))
        last_saved = n
        status.doing = f"training epoch {n + 1}"

    status.doing = f"training epoch {len(run.history) + 1}"
    try:
        # Bars only on a terminal: a redirected log gets one line per epoch, not every refresh.
        fit(run, on_epoch_end=save, progress=sys.stderr.isatty() and not args.quiet)
    except NonFiniteLoss as err:
        return error(stopping.report_divergence(err, run.optimizer.param_groups[0]["lr"], status))
    except BrokenPipeError:
        if len(run.history) > last_saved:
            save(run.history)  # the epoch whose line could not be printed is whole: keep it
        raise
    if args.metrics:
        write_metrics(args, device, status, run.recipe, run.history, run.model, commit)
    kept = (f"checkpoint: {args.save_model}" if args.save_model else
            f"no checkpoint ({'--dry-run' if args.dry_run else '--no-save'})")
    if args.metrics:
        kept += f"; metrics: {args.metrics}"
    print(final_line(run.history, kept))
    return 0


def write_metrics(args: argparse.Namespace, device: torch.device, status: stopping.Status,
                  recipe: dict, history: list[dict], model: nn.Module, commit: str | None
                  ) -> None:
    status.doing, status.metrics = "writing --metrics", args.metrics
    stopping.written(f"write --metrics {args.metrics}", lambda: metrics.write_metrics(
        args.metrics, recipe, history, model, device, commit))


def write_saved_metrics(args: argparse.Namespace, device: torch.device, status: stopping.Status,
                        checkpoint: dict) -> int:
    """A finished run resumed with --metrics (command_line.changed_recipe lets no other through):
    the metrics of its checkpoint are written, and nothing is trained."""
    model = make_model(checkpoint["recipe"])
    model.load_state_dict(checkpoint["model"])
    history = history_rows(checkpoint["history"])
    write_metrics(args, device, status, checkpoint["recipe"], history, model,
                  metrics.git_commit())
    print(final_line(history, f"checkpoint: {args.resume}; metrics: {args.metrics}"))
    return 0


def score_checkpoint(args: argparse.Namespace, device: torch.device, weights: dict,
                     recipe: dict) -> int:
    """Score saved weights on --limit-test images (default: the whole test set) with the
    recipe's loader, reading the test files only."""
    configure_process(recipe, device)
    model = prepare_model(make_model(recipe), recipe, device)
    model.load_state_dict(weights)
    if recipe["loader"] == "torchvision":  # the original pipeline, its workers included
        test_loader = torchvision_test_loader(recipe, args.data_dir, device)
    else:
        images, labels = load_mnist_tensors(args.data_dir, train=False)
        limit = recipe["limit_test"] or len(labels)
        test_loader = DeviceLoader(images[:limit], labels[:limit], recipe["test_batch_size"],
                                   device, train=False,
                                   memory_format=fast_path(recipe, device).memory_format)
    loss, acc = utils.test(model, device, test_loader, progress=False)
    print(f"{args.evaluate}: test loss {loss:.4f}, accuracy {acc:.2f}% "
          f"on {len(test_loader.dataset):,} images")
    return 0


if __name__ == "__main__":
    sys.exit(main(then_exit=True))
