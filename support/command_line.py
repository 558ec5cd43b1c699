"""train.py's command line: its flags, their checks before any work, and the commands it
suggests.

Each recipe flag is built from its field's Rule (support/recipe.py). A flag or path that
cannot work is refused in one line, in argparse's form (`UsageError`, `refuse`: exit 2),
before anything is loaded or trained. A --resume or --evaluate run's recipe is the saved one
with the flags given, by one rule (`changed_recipe`). Every suggested command pastes as it is
printed, named as the user ran train.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch

from support import checkpoints, devices, metrics, mnist_files, outputs
from support.checkpoints import epochs_text
from support.recipe import DEFAULTS, NAMED, ONECYCLES, RULES, SCHEDULES, Recipe, Rule, takers
from support.recipe import foreign_options as foreign

PROG = "train.py"
DEFAULT_CHECKPOINT = "checkpoints/last.pt"
DEFAULT_DATA_DIR = "data"
THREADS = Rule("CPU threads for torch", low=1, high=1024)  # each thread costs memory
# With --resume, these recipe keys may change the run from the next epoch on.
RESUMABLE = tuple(key for key, rule in RULES.items() if rule.on_resume)


class UsageError(ValueError):
    """A flag or path refused after parsing: one line, exit 2 (see `refuse`)."""


def refuse(message: str) -> NoReturn:
    """A usage error in argparse's form and exit code, without its 13-line usage block: that
    block helps with a malformed flag (argparse's own errors keep it), not with a refusal."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# The flags: each recipe flag from its Rule.
# ---------------------------------------------------------------------------------------------
def flag(key: str) -> str:
    """The command-line flag of a recipe key: batch_size is --batch-size."""
    return "--" + key.replace("_", "-")


def value_type(rule: Rule) -> Callable[[str], Any]:
    """`rule.parse`, named as argparse names a value it cannot convert ("invalid integer
    value: '2.5'", not the function's name)."""
    def parse(text: str) -> Any:
        return rule.parse(text)

    parse.__name__ = "integer" if rule.kind is int else "number"
    return parse


def path_text(text: str) -> str:
    """An empty path would mean the current folder, or no flag at all: refused."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def shown(value: Any) -> str:
    """A value as --help shows it: on/off, all (None), 0.1 rather than 0.1000."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "all" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def add_recipe_flags(groups: dict[str, Any]) -> None:
    """One flag per recipe key, in its Rule's group, with its Rule's type, limits and help,
    and the value of every named recipe that changes it. Each defaults to None, so a flag the
    user gave can be told from a default (a resume or an evaluation honours or refuses it)."""
    for key, rule in RULES.items():
        named = "".join(f"; {name}: {shown(recipe[key])}" for name, recipe in NAMED.items()
                        if key in recipe and key != "model")
        options: dict[str, Any] = {"help": f"{rule.help} (default: {shown(DEFAULTS[key])}{named})"}
        if rule.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif rule.choices:
            options["choices"] = list(rule.choices)
        else:
            options["type"] = value_type(rule)
        groups[rule.group].add_argument(flag(key), **options)


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


def expand_paths(args: argparse.Namespace) -> None:
    """Every path flag as outputs.user_path means it (`~` expanded), before any check."""
    for name in ("data_dir", "save_model", "resume", "evaluate", "metrics"):
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
    writing = [name for name, given in (("--save-model", args.save_model),
                                        ("--metrics", args.metrics), ("--force", args.force))
               if given]
    if args.evaluate and writing:
        raise UsageError(f"--evaluate prints its score and writes no file: drop "
                         f"{' and '.join(writing)}")


def check_data_dir(data_dir: str) -> None:
    """The data folder needs to be writable only when a file must be fetched; fail early, as
    a usage error, rather than after an epoch of training."""
    try:
        mnist_files.check_folders(data_dir)
        fetch = mnist_files.needs_fetch(data_dir)
    except mnist_files.DataFileError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"--data-dir {data_dir}: {err.strerror or err}") from None
    if not fetch:
        return
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir):
            pass
    except OSError as err:
        raise UsageError(f"--data-dir {data_dir} is not writable: {err.strerror or err}") from None


def check_paths(args: argparse.Namespace) -> None:
    """outputs.py's policy, up to what needs the lock: every output a writable file, none an
    input, no two the same."""
    check_input("--resume", args.resume)
    check_input("--evaluate", args.evaluate)
    planned = planned_outputs(args)
    try:
        for name, path in planned.items():
            try:
                outputs.check_writable(name, path,
                                       "out.json" if name == "--metrics" else "last.pt")
            except outputs.Refused as err:
                # A resume saves into its checkpoint: where that cannot be written, say where.
                more = ("; continue it into another file with --save-model OTHER.pt"
                        if name == "--resume" else "")
                raise UsageError(f"{err}{more}") from None
        outputs.check_distinct(planned, inputs(args))
    except outputs.Refused as err:
        raise UsageError(str(err)) from None


def check_input(flag_name: str, path: str | None) -> None:
    """A checkpoint to read must be a file that is there: a missing one is refused before
    its folder is made for the save, a folder is named as one (with the checkpoints in it),
    and a path that cannot even be looked at (a name too long, a loop of links) says why. A
    damaged file is read_checkpoint's to explain."""
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
    resume = checkpoint_command("--resume", path, data_dir)
    if done < total:
        return (f"{path} already exists and holds {epochs_text(done)} of {total}; resume it with "
                f"`{resume}`, {keep}")
    further = (f"train it further with `{resume} --epochs {done + 5}`"
               if saved["recipe"]["schedule"] not in ONECYCLES else
               f"its OneCycle schedule has ended, so train a longer run anew with "
               f"`{longer_run(saved['recipe'], path, data_dir, done + 5)}`")
    return (f"{path} already exists and holds a finished run ({epochs_text(done)} of {total}); "
            f"{further}, score it with "
            f"`{checkpoint_command('--evaluate', path, data_dir)}`, {keep}")


# ---------------------------------------------------------------------------------------------
# The recipe: a new run's, or the saved one with the flags given.
# ---------------------------------------------------------------------------------------------
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
    foreign_keys = foreign(values)
    if foreign_keys:
        verb, them = ("applies", "it") if len(foreign_keys) == 1 else ("apply", "them")
        models = takers(foreign_keys[0])
        raise UsageError(f"{' and '.join(flag(k) for k in foreign_keys)} {verb} to the "
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


def changed_recipe(args: argparse.Namespace, checkpoint: dict) -> dict:
    """The saved recipe with the recipe flags given, for --resume or --evaluate, checked by
    Recipe's rules as a new run's is. A flag given with the value the recipe holds is no
    change. A change is refused where the file fixes it (a Rule that is not `on_resume`, or
    `on_evaluate`), or where the saved schedule fixed it at its start (SCHEDULES); so is a
    resume with no epochs left, unless it only writes the finished run's --metrics."""
    saved, evaluating = checkpoint["recipe"], bool(args.evaluate)
    given = given_recipe(args)
    changes = {k: v for k, v in given.items() if v != saved[k]}
    may = "on_evaluate" if evaluating else "on_resume"
    ignored = "; ".join(f"{flag(k)} {v} (saved: {saved[k]})" for k, v in changes.items()
                        if not getattr(RULES[k], may))
    if ignored and evaluating:
        raise UsageError(f"--evaluate scores the saved model with its own recipe, so {ignored} "
                         f"cannot apply: drop them (only {allowed(may)} apply to an evaluation)")
    if ignored:
        raise UsageError(f"--resume continues the saved recipe, so {ignored} cannot apply: drop "
                         f"them, or start a new run with --save-model NEW.pt (only "
                         f"{allowed(may)} may change on resume)")
    if evaluating:  # the test set's size and batch: the flags', else the whole set by default
        return Recipe.of({**saved, **{k: given.get(k, DEFAULTS[k])
                                      for k, rule in RULES.items() if rule.on_evaluate}}).as_dict()
    done, fixed = len(checkpoint["history"]["epoch"]), SCHEDULES[saved["schedule"]]
    finished = done >= saved["epochs"]
    if finished and args.metrics and not changes:
        return dict(saved)  # trains nothing: writes the finished run's metrics
    if any(k in fixed for k in changes) or ("epochs" in fixed and finished):
        refuse_fixed_schedule(args, saved, {k: v for k, v in changes.items() if k in fixed},
                              done)
    recipe = Recipe.of({**saved, **changes}).as_dict()
    if recipe["epochs"] <= done:
        raise UsageError(f"{args.resume} already holds {epochs_text(done)} of {recipe['epochs']}: "
                         f"give --epochs more than {done} to train further, or score it with "
                         f"--evaluate")
    return recipe


def allowed(may: str) -> str:
    """The flags whose Rule says `may` ("on_resume", "on_evaluate"): "--a, --b and --c"."""
    keys = [flag(k) for k, rule in RULES.items() if getattr(rule, may)]
    return " and ".join([", ".join(keys[:-1]), keys[-1]])


def refuse_fixed_schedule(args: argparse.Namespace, recipe: dict, changes: dict,
                          done: int) -> NoReturn:
    """A schedule fixed at its start by its epochs and peak lr (docs/resume.md) is followed to
    its end; a change is refused, pointing to what works: the rest of the cycle, or a new run
    with the change."""
    data_dir = None if args.data_dir == DEFAULT_DATA_DIR else args.data_dir
    if changes:
        cause = f"so {' and '.join(flag(k) for k in changes)} cannot change it"
        new = ("train a new run with the change: `" + new_run_command(
            recipe, data_dir, unused_path(args.resume, "new"), **changes) + "`")
    else:
        cause = "so no --epochs can extend it"
        new = f"train a longer run anew: `{longer_run(recipe, args.resume, data_dir, done + 5)}`"
    if done >= recipe["epochs"]:
        state = (f"its cycle has ended ({epochs_text(done)} of {recipe['epochs']}): score it "
                 f"with `{checkpoint_command('--evaluate', args.resume, data_dir)}`")
    else:
        state = f"continue its cycle with `{checkpoint_command('--resume', args.resume, data_dir)}`"
    raise UsageError(f"{args.resume} follows a OneCycle schedule fixed at its start by its "
                     f"{epochs_text(recipe['epochs'])} and peak lr {recipe['lr']:g}, {cause}: "
                     f"{state}, or {new}")


# ---------------------------------------------------------------------------------------------
# The commands a message suggests: each pastes as it is printed.
# ---------------------------------------------------------------------------------------------
def invocation() -> list[str]:
    """train.py as the user ran it, so that a hint pastes where they ran it: the script's path
    as they typed it, after their interpreter: `python` where that finds this one on PATH (a
    link beside it in the same folder is the same environment), else its path. Called from
    elsewhere (a test, a benchmark), `python train.py`."""
    if Path(sys.argv[0]).name != PROG:
        return ["python", PROG]
    here = os.path.abspath(sys.executable)
    on_path = shutil.which("python")
    same = on_path is not None and os.path.dirname(os.path.abspath(on_path)) == (
        os.path.dirname(here)) and os.path.samefile(on_path, here)
    return ["python" if same else here, sys.argv[0]]


def checkpoint_command(option: str, path: str, data_dir: str | None, *more: str) -> str:
    """`python train.py OPTION PATH`, with the run's data folder when it is not the default."""
    words = [*invocation(), *given(option, path)]
    if data_dir is not None:
        words += given("--data-dir", data_dir)
    return shlex.join([*words, *more])


def new_run_command(recipe: dict, data_dir: str | None, save_model: str, **changes: object
                    ) -> str:
    """`python train.py ...` that trains `recipe` anew, with `changes` (recipe keys), into
    `save_model`: its model's named recipe and the flags of every value that differs from it,
    so that the new run repeats the saved one but for the changes."""
    recipe = {**recipe, **changes}
    named = Recipe.of({"model": recipe["model"]}).as_dict()
    words = invocation()
    if recipe["model"] != DEFAULTS["model"]:
        words += ["--model", recipe["model"]]  # first: it names the recipe the rest changes
    for key, value in recipe.items():
        # OneCycle ignores StepLR's keys, so a flag for them would be refused
        skip = recipe["schedule"] in ONECYCLES and key in ("step_size", "gamma")
        if skip or key == "model" or value == named[key]:
            continue
        if isinstance(value, bool):
            words.append(flag(key) if value else "--no-" + key.replace("_", "-"))
        else:
            words += given(flag(key), str(value))
    if data_dir is not None:
        words += given("--data-dir", data_dir)
    return shlex.join([*words, *given("--save-model", save_model)])


def longer_run(recipe: dict, path: str, data_dir: str | None, epochs: int) -> str:
    """The command that trains `recipe` anew for `epochs`, into a file beside `path` that
    does not exist yet (a OneCycle run cannot be extended: docs/resume.md)."""
    return new_run_command(recipe, data_dir, unused_path(path, f"{epochs}ep"), epochs=epochs)


def given(name: str, value: str) -> list[str]:
    """A flag and its value; joined when the value starts with '-' (`--resume=-run.pt`): on
    its own, argparse would take it for a flag and refuse the pasted command."""
    return [f"{name}={value}"] if value.startswith("-") else [name, value]


def unused_path(beside: str, tag: str) -> str:
    """A file name beside `beside` that no file has yet: NAME-TAG.pt, then NAME-TAG-2.pt..."""
    path = Path(beside)
    for n in range(1, 1000):
        name = f"{path.stem}-{tag}{'' if n == 1 else f'-{n}'}{path.suffix or '.pt'}"
        candidate = str(path.with_name(name))
        if not os.path.lexists(candidate):
            return candidate
    return str(path.with_name(f"{path.stem}-{tag}-{os.getpid()}{path.suffix or '.pt'}"))
