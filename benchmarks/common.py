"""What the benchmark scripts share: argparse types, reading train.py's result files, running
a batch of train.py runs that Ctrl-C stops cleanly, and the searches (compact.py, tiny.py):
candidates of train.py flags, one result file per seed, a report from those files.

A result file is usable when it is valid JSON, an object holding the numbers a report reads,
each finite, and a history whose columns have one length. seeds.py and ablation.py skip a file
that is not (naming it in one warning line), and count a run as done only when its file is
usable: a file left empty or cut short by a failed write is run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import outputs

MAX_INT = 2**31 - 1  # train.py's limit too (support.recipe), without loading torch

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# argparse types: a bad count is a one-line usage error (exit 2), not a traceback later.
# train.py's recipe flags (support.command_line) leave a non-integer to argparse ("invalid
# integer value"); these say "must be an integer", which test_benchmarks pins.
# ---------------------------------------------------------------------------------------------
def out_folder(text: str) -> Path:
    """--out: a folder (made by the run if missing), `~` expanded as outputs.user_path does;
    an existing file or FIFO of that name is a usage error, not a FileExistsError later."""
    path = Path(outputs.user_path(text))
    if os.path.exists(path) and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: give the folder "
                                         f"of the results (made if missing)")
    return path


def report_folder(out: Path, default: Path) -> None:
    """--report reads --out only: a private --out that is not there is a typo, refused
    (`SystemExit` with one line) before any figure is drawn."""
    if out != default and not out.is_dir():
        sys.exit(f"error: --out {out}: no such folder of results; give the folder a run "
                 f"wrote (default {default})")


def positive_int(text: str) -> int:
    return _int_from(text, 1)


def non_negative_int(text: str) -> int:
    return _int_from(text, 0)


def _int_from(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not low <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be an integer from {low} to {MAX_INT:,}, "
                                         f"got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# Result files.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """What a report reads from a result file: top-level numbers, and history columns."""

    numbers: tuple[str, ...]
    columns: tuple[str, ...] = ()


class Unusable(ValueError):
    """A result file a report cannot use; the message says why."""


def read_result(path: Path, needs: Needs) -> dict[str, Any]:
    """train.py's metrics from `path`, checked against `needs`; Unusable if they fail."""
    try:
        text = Path(path).read_bytes().decode()
    except OSError as err:
        raise Unusable(f"cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise Unusable("not valid JSON (not even text)") from None
    if not text.strip():
        raise Unusable("empty file (a write that failed?)")
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError:
        raise Unusable("not valid JSON (truncated?)") from None
    check(metrics, needs)
    return metrics


def check(metrics: Any, needs: Needs) -> None:
    """Raise Unusable unless `metrics` holds every number and history column in `needs`."""
    if not isinstance(metrics, dict):
        raise Unusable("not a JSON object")
    wanted = [*needs.numbers, *(["history"] if needs.columns else [])]
    missing = [k for k in wanted if k not in metrics]
    if missing:
        raise Unusable(f"no {', '.join(map(repr, missing))}")
    for key in needs.numbers:
        _finite(metrics[key], repr(key))
    if needs.columns:
        _check_history(metrics["history"], needs.columns)


def _check_history(history: Any, columns: tuple[str, ...]) -> None:
    if not isinstance(history, dict):
        raise Unusable("'history' is not a JSON object")
    missing = [c for c in columns if not isinstance(history.get(c), list)]
    if missing:
        raise Unusable(f"no history column {', '.join(map(repr, missing))}")
    lengths = {name: len(col) for name, col in history.items() if isinstance(col, list)}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise Unusable(f"history columns differ in length ({shown})")
    if not lengths[columns[0]]:
        raise Unusable("empty history")
    for name in columns:
        for value in history[name]:
            _finite(value, f"history {name!r}")


def _finite(value: Any, what: str) -> None:
    # bool is an int to Python, but true is no accuracy.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unusable(f"{what} is not a number ({json.dumps(value)[:20]})")
    if not math.isfinite(value):
        raise Unusable(f"{what} is {json.dumps(value)}, not a finite number")


def load_result(path: Path, needs: Needs) -> dict[str, Any] | None:
    """The metrics in `path`, or None after one warning line on stderr naming the file."""
    try:
        return read_result(path, needs)
    except Unusable as err:
        print(f"warning: skipped {shown(path)}: {err}", file=sys.stderr, flush=True)
        return None


def still_to_run(path: Path, needs: Needs, label: str, force: bool = False) -> bool:
    """Whether a run must run: forced, no result file yet, or one it cannot use (said in one
    line), e.g. a file a failed write left empty, which would otherwise count as done forever."""
    if force or not Path(path).exists():
        return True
    try:
        read_result(path, needs)
    except Unusable as err:
        print(f"{label}: {shown(path)} is unusable ({err}); running it again", flush=True)
        return True
    return False


def shown(path: Path) -> str:
    """The path as the user would type it: relative to the working directory when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Running a batch.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One train.py run: what to call it, its command, and the file its output goes to."""

    label: str
    command: list[str]
    log: Path


class Interrupted(Exception):
    """Ctrl-C stopped a batch; the message says what finished and that re-running continues."""

    def __init__(self, finished: list[str], total: int) -> None:
        names = f" ({', '.join(finished)})" if finished else ""
        left = total - len(finished)
        super().__init__(f"interrupted (Ctrl-C) after {len(finished)} of {total} runs "
                         f"finished{names}; the same command again runs the other {left} "
                         "(finished runs are skipped)")


INTERRUPT_GRACE = 1.0  # seconds a failed run waits to learn whether Ctrl-C ended it


class Batch:
    """Runs jobs `jobs` at a time, each in its own process; on Ctrl-C, stops those in flight,
    starts no more, and raises Interrupted."""

    def __init__(self, jobs: int, env: dict[str, str]) -> None:
        self.jobs, self.env = jobs, env
        self.lock = threading.Lock()
        self.stopped = threading.Event()  # set on Ctrl-C, under the lock; a worker waits on it
        self.running: set[subprocess.Popen] = set()
        self.finished: list[str] = []

    def run(self, todo: list[Job]) -> list[int | None]:
        """Each job's exit code, in order (None for a job the interrupt kept from starting)."""
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = [pool.submit(self._one, job) for job in todo]
            codes = [f.result() for f in futures]
        except KeyboardInterrupt:
            self._stop(pool)
            raise Interrupted(list(self.finished), len(todo)) from None
        pool.shutdown()
        return codes

    def _one(self, job: Job) -> int | None:
        with self.lock:
            if self.stopped.is_set():
                return None
            with open(job.log, "w") as log:
                proc = subprocess.Popen(job.command, cwd=ROOT, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT)
            self.running.add(proc)
        code = proc.wait()
        if code != 0:
            # Ctrl-C at a terminal reaches the run too, which may end before the main thread
            # has taken the interrupt: give it a moment, so the run is not reported as failed.
            self.stopped.wait(INTERRUPT_GRACE)
        with self.lock:
            self.running.discard(proc)
            if self.stopped.is_set():  # the interrupt's line is the last one printed
                return code
            if code == 0:
                self.finished.append(job.label)
            print(f"{job.label}: exit {code}, log in {job.log}", flush=True)
        return code

    def _stop(self, pool: ThreadPoolExecutor) -> None:
        # A second Ctrl-C meanwhile would turn the one-line ending into a traceback.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            with self.lock:
                self.stopped.set()
                running = list(self.running)
            for proc in running:
                # Ctrl-C at a terminal reached them already; `kill -INT` of this process did
                # not. train.py ignores a second one while it says what it saved.
                proc.send_signal(signal.SIGINT)
            for proc in running:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def run_batch(todo: list[Job], jobs: int, threads: int) -> list[int | None]:
    """Run the jobs, `jobs` at a time with `threads` threads each; Interrupted on Ctrl-C."""
    # Several runs share the cores: give each its own threads rather than let them fight.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return Batch(jobs, env).run(todo)


def run_all(todo: list[Job], jobs: int, threads: int) -> int | None:
    """run_batch for a benchmark's main: how many runs failed, or None once Ctrl-C stopped the
    batch (which runs finished is said on stderr; the script then exits 130)."""
    try:
        codes = run_batch(todo, jobs, threads)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return None
    return sum(rc != 0 for rc in codes)


def pending(names: list[str], seeds: list[int], path_of: Callable[[str, int], Path],
            needs: Needs, force: bool = False) -> list[tuple[str, int]]:
    """(name, seed) of each run still to do (still_to_run), seed by seed, so that a batch
    stopped half-way leaves every name with some seeds; a run skipped says so."""
    todo = []
    for seed in seeds:
        for name in names:
            label = f"{name} seed {seed}"
            if still_to_run(path_of(name, seed), needs, label, force):
                todo.append((name, seed))
            else:
                print(f"{label}: skipped, results exist", flush=True)
    return todo


def default_threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


# ---------------------------------------------------------------------------------------------
# A search (compact.py, tiny.py): named candidates, each a full set of train.py flags, run for
# several seeds, one result file per run, and a report from those files alone.
# ---------------------------------------------------------------------------------------------
SEARCH_NEEDS = Needs(("parameters", "final_test_acc"), columns=("epoch", "test_acc"))


@dataclass(frozen=True)
class Candidate:
    """train.py flags of one candidate ({flag: value}; an empty value is a switch), and what
    it tries."""

    flags: dict[str, str]
    idea: str

    def train_flags(self) -> list[str]:
        flags: list[str] = []
        for flag, value in self.flags.items():
            flags += [flag, value] if value else [flag]
        return flags


def search_result(out: Path, candidate: str, seed: int) -> Path:
    return Path(out) / f"{candidate}_seed{seed}.json"


def search_job(candidate: str, flags: list[str], seed: int, args: argparse.Namespace) -> Job:
    """One train.py run of a candidate, its log next to its JSON."""
    path = search_result(args.out, candidate, seed)
    cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), *flags, "--metrics",
           str(path), "--no-save", "--quiet", *args.train_args]
    return Job(f"{candidate} seed {seed}", cmd, path.with_suffix(".log"))


def load_search(out: str | os.PathLike, order: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """{candidate: {seed: train.py's metrics}} for every candidate with a result file, those
    named in `order` first, in its order; a file the report cannot use is skipped with a
    warning."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(Path(out).glob("*_seed*.json")):
        found = re.fullmatch(r"(.+)_seed(\d+)\.json", path.name)
        if found and (metrics := load_result(path, SEARCH_NEEDS)) is not None:
            results.setdefault(found.group(1), {})[int(found.group(2))] = metrics
    names = [c for c in order if c in results] + sorted(set(results) - set(order))
    return {name: results[name] for name in names}


@dataclass(frozen=True)
class SearchRow:
    """One candidate's seeds: final = the last epoch's test accuracy (the searches' measure),
    best = the best epoch's (shown, never used to choose)."""

    candidate: str
    parameters: int
    finals: dict[int, float]  # seed -> last epoch's test accuracy
    bests: dict[int, float]  # seed -> best epoch's test accuracy

    @property
    def mean(self) -> float:
        return statistics.mean(self.finals.values())

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.finals.values()) if len(self.finals) > 1 else None


def summarise_search(results: dict[str, dict[int, dict[str, Any]]],
                     row: type[SearchRow] = SearchRow) -> list[Any]:
    """A `row` per candidate with results, its seeds in order."""
    return [row(name, next(iter(runs.values()))["parameters"],
                {s: runs[s]["final_test_acc"] for s in sorted(runs)},
                {s: max(runs[s]["history"]["test_acc"]) for s in sorted(runs)})
            for name, runs in results.items() if runs]


def search_table(rows: list[Any], bar: str, verdict: Callable[[Any], str]) -> str:
    """The rows as Markdown, the last column headed `bar` and filled by `verdict`."""
    lines = ["| candidate | parameters | seeds | final acc % per seed | mean | sd | min "
             f"| best epoch's acc % per seed | {bar} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = f"{r.sd:.3f}" if r.sd is not None else "–"
        finals = ", ".join(f"{a:.2f}" for a in r.finals.values())
        bests = ", ".join(f"{a:.2f}" for a in r.bests.values())
        lines.append(f"| {r.candidate} | {r.parameters:,} | {', '.join(map(str, r.finals))} "
                     f"| {finals} | {r.mean:.3f} | {sd} | {min(r.finals.values()):.2f} "
                     f"| {bests} | {verdict(r)} |")
    return "\n".join(lines)


def search_args(doc: str, candidates: list[str], results: Path,
                argv: list[str] | None = None) -> argparse.Namespace:
    """A search's command line: which candidates and seeds, how many runs at once, where."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--candidates", nargs="+", default=candidates, choices=candidates)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at once")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads per run (default: cores/jobs)")
    p.add_argument("--out", type=out_folder, default=results, help="folder of the JSON files")
    p.add_argument("--force", action="store_true", help="re-run runs that already have results")
    p.add_argument("--report", action="store_true",
                   help="run nothing: print the table from --out")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = p.parse_args(argv)
    args.threads = args.threads or default_threads(args.jobs)
    return args


def run_search(args: argparse.Namespace, results: Path, flags_of: Callable[[str], list[str]],
               report: Callable[[Path], str]) -> int:
    """A search's main: the runs still to do (seed by seed, `pending`), then the report; 130
    after Ctrl-C, 1 when a run failed."""
    failed = 0
    if args.report:
        report_folder(args.out, results)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        todo = pending(args.candidates, args.seeds,
                       lambda name, seed: search_result(args.out, name, seed), SEARCH_NEEDS,
                       args.force)
        failed = run_all([search_job(c, flags_of(c), s, args) for c, s in todo], args.jobs,
                         args.threads)
        if failed is None:
            return 130
    print(report(args.out))
    return 1 if failed else 0
