"""The checks of train.py's flags and paths, made before any work starts.

A flag or path that cannot work is refused in one line, in argparse's form (`UsageError`,
`refuse`: exit 2), before anything is loaded or trained: flags that exclude each other, a
device that is not there, a data folder that cannot be read or fetched into, and outputs that
break support/outputs.py's policy. `check_flags` runs them in that order; while the run holds
its checkpoint's lock (`checkpoint_held`), `check_replacements` refuses to replace a file that
is not the run's own. A --resume or --evaluate run takes its recipe from the checkpoint
(`resume_recipe`, `evaluation_recipe`), and refuses recipe flags that would be ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch

from support import checkpoints, devices, metrics, mnist_files, outputs, stopping
from support.checkpoints import epochs_text
from support.flag_types import flag
from support.recipe import (
    DEFAULTS,
    NAMED,
    ONECYCLES,
    RULES,
    SCHEDULES,
    Recipe,
    check_recipe,
    foreign_options,
    takers,
)

DEFAULT_CHECKPOINT = "checkpoints/last.pt"
DEFAULT_DATA_DIR = "data"
# With --resume, these recipe keys may change the run from the next epoch on.
RESUMABLE = tuple(key for key, rule in RULES.items() if rule.on_resume)


class UsageError(ValueError):
    """A flag or path refused after parsing: one line, exit 2 (see `refuse`)."""


def refuse(message: str) -> NoReturn:
    """A usage error in argparse's form and exit code, without its 13-line usage block: that
    block helps with a malformed flag (argparse's own errors keep it), not with a refusal."""
    print(f"{stopping.PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Before any work: each failure is a one-line usage error.
# ---------------------------------------------------------------------------------------------
def check_flags(args: argparse.Namespace) -> torch.device:
    """The device the flags name, once every flag and path is checked; fills in --save-model
    (None when nothing is saved). A failed check is `refuse`d: one line, SystemExit 2."""
    try:
        expand_paths(args)
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
    return device


PATH_FLAGS = ("data_dir", "save_model", "resume", "evaluate", "metrics")


def expand_paths(args: argparse.Namespace) -> None:
    """Every path flag as outputs.user_path means it (`~` expanded), before any check."""
    for name in PATH_FLAGS:
        if getattr(args, name, None) is not None:
            setattr(args, name, outputs.user_path(getattr(args, name)))


def check_combinations(args: argparse.Namespace) -> None:
    if args.evaluate and args.resume:
        raise UsageError("--evaluate and --resume exclude each other: score a checkpoint, "
                         "or continue its training")
    if args.no_save and args.save_model:
        raise UsageError("--no-save and --save-model exclude each other: drop --no-save to "
                         "save in --save-model's file, or drop --save-model to write none")
    if args.dry_run and (args.resume or args.evaluate):
        raise UsageError("--dry-run checks a new run's set-up; it cannot be combined with "
                         "--resume or --evaluate")
    writing = [flag for flag, given in (("--save-model", args.save_model),
                                        ("--metrics", args.metrics), ("--force", args.force))
               if given]
    if args.evaluate and writing:
        raise UsageError(f"--evaluate prints its score and writes no file: drop "
                         f"{' and '.join(writing)}")


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


def check_writable_dir(path: Path, what: str) -> None:
    """Fail early, as a usage error, rather than after an epoch of training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{what} {path} is not writable: {err.strerror or err}") from None


def check_paths(args: argparse.Namespace) -> None:
    """outputs.py's policy, up to what needs the lock: every output a writable file, none an
    input, no two the same."""
    check_input("--resume", args.resume)
    check_input("--evaluate", args.evaluate)
    planned = planned_outputs(args)
    for name, path in planned.items():
        try:
            outputs.check_writable(name, path, "out.json" if name == "--metrics" else "last.pt")
        except outputs.Refused as err:
            # A resume saves into its checkpoint: where that cannot be written, say where can.
            more = ("; continue it into another file with --save-model OTHER.pt"
                    if name == "--resume" else "")
            raise UsageError(f"{err}{more}") from None
    try:
        outputs.check_distinct(planned, inputs(args))
    except outputs.Refused as err:
        raise UsageError(str(err)) from None


def check_input(flag_name: str, path: str | None) -> None:
    """A checkpoint to read must be a file that is there: a missing one is refused before
    its folder is made for the save (`--resume typo/last.pt` used to leave typo/ behind), a
    folder is named as one (with the checkpoints in it), and a path that cannot even be
    looked at (a name too long, a loop of links) says why. A damaged file is
    read_checkpoint's to explain."""
    if path is None:
        return
    try:
        is_folder = os.path.isdir(path)
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        bare = path.rstrip("/" + os.sep)
        if bare != path and os.path.isfile(bare):  # a shell's completion adds the '/'
            raise UsageError(f"{flag_name} {path}: {bare} is a file, not a folder: drop the "
                             f"trailing '/'") from None
        raise UsageError(f"{flag_name} {path}: no such file") from None
    except OSError as err:
        raise UsageError(f"{flag_name} {path}: {err.strerror or err}") from None
    if is_folder:
        raise UsageError(f"{flag_name} {path} is a folder, not a checkpoint: give the "
                         f"checkpoint file itself{checkpoints_in(Path(path))}")
    try:
        outputs.check_kind(flag_name, path)
    except outputs.Refused as err:
        raise UsageError(str(err)) from None


def checkpoints_in(folder: Path, most: int = 3) -> str:
    """', such as FOLDER/last.pt' for the .pt files in `folder` (a few), or ''."""
    try:
        found = sorted(p for p in folder.glob("*.pt") if p.is_file())[:most]
    except OSError:
        return ""
    return f", such as {' or '.join(str(p) for p in found)}" if found else ""


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


def same_file(a: str, b: str | None) -> bool:
    return b is not None and outputs.target(a) == outputs.target(b)


# ---------------------------------------------------------------------------------------------
# While the run holds its checkpoint: no file replaced that is not the run's own.
# ---------------------------------------------------------------------------------------------
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
        saved = checkpoints.read_checkpoint(path)
    except checkpoints.CheckpointError:
        return f"{path} already exists and is not a checkpoint of this model: {keep}"
    done, total = len(saved["history"]["epoch"]), saved["recipe"]["epochs"]
    data_dir = None if data_dir == DEFAULT_DATA_DIR else data_dir
    resume = stopping.resume_command(path, data_dir)
    if done < total:
        return (f"{path} already exists and holds {epochs_text(done)} of {total}; resume it with "
                f"`{resume}`, {keep}")
    further = (f"train it further with `{resume} --epochs {done + 5}`"
               if saved["recipe"]["schedule"] not in ONECYCLES else
               f"its OneCycle schedule has ended, so train a longer run anew with "
               f"`{longer_run(saved['recipe'], path, data_dir, done + 5)}`")
    return (f"{path} already exists and holds a finished run ({epochs_text(done)} of {total}); "
            f"{further}, score it with "
            f"`{stopping.checkpoint_command('--evaluate', path, data_dir)}`, {keep}")


def longer_run(recipe: dict, path: str, data_dir: str | None, epochs: int) -> str:
    """The command that trains `recipe` anew for `epochs`, into a file beside `path` that
    does not exist yet (a OneCycle run cannot be extended: docs/resume.md)."""
    return stopping.new_run_command(recipe, data_dir, stopping.unused_path(path, f"{epochs}ep"),
                                    epochs=epochs)


# ---------------------------------------------------------------------------------------------
# --resume and --evaluate: the saved recipe with the flags given, or a refusal that says why.
# ---------------------------------------------------------------------------------------------
def resume_recipe(args: argparse.Namespace, checkpoint: dict) -> dict:
    """The saved recipe with the flags given, checked by the rules of a new run. A flag given
    with the value the recipe holds is no change. A change is refused where the checkpoint
    fixes it (a field that is not `on_resume`) or the saved schedule fixed it at its start
    (SCHEDULES), as is a resume with no epochs left."""
    saved = checkpoint["recipe"]
    changes = changed(args, saved, "on_resume", "--resume continues the saved recipe",
                      "drop them, or start a new run with --save-model NEW.pt (only "
                      f"{allowed('on_resume')} may change on resume)")
    done = len(checkpoint["history"]["epoch"])
    fixed = SCHEDULES[saved["schedule"]]
    if any(k in fixed for k in changes) or ("epochs" in fixed and done >= saved["epochs"]):
        refuse_fixed_schedule(args, saved, {k: v for k, v in changes.items() if k in fixed},
                              done)
    recipe = check_recipe({**saved, **changes})
    if recipe["epochs"] <= done:
        raise UsageError(f"{args.resume} already holds {epochs_text(done)} of {recipe['epochs']}: "
                         f"give --epochs more than {done} to train further, "
                         f"or score it with --evaluate")
    return recipe


def allowed(may: str) -> str:
    """The flags whose Rule says `may` ("on_resume", "on_evaluate"): "--a, --b and --c"."""
    keys = [flag(k) for k, rule in RULES.items() if getattr(rule, may)]
    return " and ".join([", ".join(keys[:-1]), keys[-1]])


def evaluation_recipe(args: argparse.Namespace, checkpoint: dict) -> dict:
    """The checkpoint's own recipe (its model, its loader), with the test set's size and
    batch size from the flags."""
    changed(args, checkpoint["recipe"], "on_evaluate",
            "--evaluate scores the saved model with its own recipe",
            f"drop them (only {allowed('on_evaluate')} apply to an evaluation)")
    given = given_recipe(args)
    return check_recipe({**checkpoint["recipe"], **{
        k: given.get(k, DEFAULTS[k]) for k, rule in RULES.items() if rule.on_evaluate}})


def changed(args: argparse.Namespace, saved: dict, may: str, mode: str, remedy: str) -> dict:
    """The recipe flags given that differ from the saved recipe; those whose Rule does not
    allow it (`may`: "on_resume" or "on_evaluate") are refused, saying what `mode` does and
    what to do instead, rather than ignored without a word."""
    changes = {k: v for k, v in given_recipe(args).items() if v != saved[k]}
    ignored = "; ".join(f"{flag(k)} {v} (saved: {saved[k]})" for k, v in changes.items()
                        if not getattr(RULES[k], may))
    if ignored:
        raise UsageError(f"{mode}, so {ignored} cannot apply: {remedy}")
    return changes


def refuse_fixed_schedule(args: argparse.Namespace, recipe: dict, changes: dict,
                          done: int) -> None:
    """A schedule fixed at its start by its epochs and peak lr (docs/resume.md) is followed to
    its end; a change is refused, pointing to what works: the rest of the cycle, or a new run
    with the change."""
    finished = done >= recipe["epochs"]
    data_dir = None if args.data_dir == DEFAULT_DATA_DIR else args.data_dir
    if changes:
        cause = f"so {' and '.join(flag(k) for k in changes)} cannot change it"
        new = ("train a new run with the change: `" + stopping.new_run_command(
            recipe, data_dir, stopping.unused_path(args.resume, "new"), **changes) + "`")
    else:
        cause = "so no --epochs can extend it"
        new = f"train a longer run anew: `{longer_run(recipe, args.resume, data_dir, done + 5)}`"
    if finished:
        state = (f"its cycle has ended ({epochs_text(done)} of {recipe['epochs']}): score it "
                 f"with `{stopping.checkpoint_command('--evaluate', args.resume, data_dir)}`")
    else:
        state = f"continue its cycle with `{stopping.resume_command(args.resume, data_dir)}`"
    raise UsageError(f"{args.resume} follows a OneCycle schedule fixed at its start by its "
                     f"{epochs_text(recipe['epochs'])} and peak lr {recipe['lr']:g}, {cause}: "
                     f"{state}, or {new}")


def given_recipe(args: argparse.Namespace) -> dict:
    """The recipe flags the user gave (a flag not given is None)."""
    return {key: getattr(args, key) for key in RULES if getattr(args, key, None) is not None}


def new_recipe(args: argparse.Namespace) -> Recipe:
    """A new run's recipe: its --model's named recipe with the flags given, refused in the
    flags' words where Recipe's rules would refuse it. The StepLR flags a OneCycle schedule
    would ignore are refused, and so is a OneCycle of one epoch, which would train at its
    floor lr (peak / 250,000)."""
    given = given_recipe(args)
    values = {**NAMED[given.get("model", "s6")], **given}
    foreign = foreign_options(values)
    if foreign:
        verb, them = ("applies", "it") if len(foreign) == 1 else ("apply", "them")
        models = takers(foreign[0])
        raise UsageError(f"{' and '.join(flag(k) for k in foreign)} {verb} to the "
                         f"{' and '.join(models)} model{'s' * (len(models) > 1)} only, not to "
                         f"--model {values['model']}: drop {them}")
    if values.get("nesterov") and values.get("momentum", DEFAULTS["momentum"]) == 0:
        raise UsageError("--nesterov needs momentum: give --momentum above 0, or --no-nesterov")
    recipe = Recipe.of(values)
    if recipe.schedule not in ONECYCLES:
        return recipe
    ignored = [flag(k) for k in ("step_size", "gamma") if k in given]
    whose = f" (--model {recipe.model}'s)" if args.schedule is None else ""
    if ignored:
        verb = "applies" if len(ignored) == 1 else "apply"
        raise UsageError(f"{' and '.join(ignored)} {verb} to --schedule step only, and this "
                         f"run's schedule is {recipe.schedule}{whose}: drop "
                         f"{'it' if len(ignored) == 1 else 'them'}, or add --schedule step")
    if recipe.schedule == "onecycle" and recipe.epochs < 2 and not args.dry_run:
        raise UsageError(f"a OneCycle schedule{whose} is stepped once per epoch and spends its "
                         f"last epoch at its floor, lr {recipe.lr / 25e4:g} (peak / 250,000), "
                         f"so a 1-epoch run would not train: give --epochs 2 or more, or add "
                         f"--schedule step")
    return recipe


