"""The speedrun against the compact recipe, side by side (issue 33; docs/speedrun.md).

For each seed, `python train.py --model speedrun` and then `python train.py --model compact`,
one process launch each, one after the other, on the same threads (--threads, given to both
as train.py's --threads and as OMP_NUM_THREADS). Each run's result file is train.py's --metrics
file with, added once the process has ended, `process_seconds` (the wall time of the whole
process, from launch to exit: interpreter, imports, data, training, every test pass) and
`machine` (the CPU, its cores, the OS). Runs whose file is complete are skipped (delete it, or
pass --force). `--report` prints the table, each seed's final accuracy and the time ratio, and
draws test accuracy against seconds for every run (images/speedrun.png).

    python benchmarks/speedrun.py --seeds 1 2 3 4 5 --threads 2   # the side-by-side runs
    python benchmarks/speedrun.py --report                       # table, ratio and figure
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, it sees only benchmarks/
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from support import outputs  # noqa: E402
from support.figures import TARGET_ACC, finish, legible  # noqa: E402

RESULTS = ROOT / "results" / "speedrun"
FIGURE = ROOT / "images" / "speedrun.png"
RECIPES = ("speedrun", "compact")  # run in this order for each seed; named by train.py's --model
NEEDS = common.Needs(("parameters", "final_test_acc", "process_seconds", "threads"),
                     columns=("epoch", "test_acc", "seconds"))
COLOURS = {"speedrun": "tab:orange", "compact": "tab:blue"}


def result_path(out: Path, recipe: str, seed: int) -> Path:
    return Path(out) / f"{recipe}_seed{seed}.json"


# ---------------------------------------------------------------------------------------------
# One timed run: this script again, in `--timed` mode, launches train.py and times it.
# ---------------------------------------------------------------------------------------------
def job(recipe: str, seed: int, args: argparse.Namespace) -> common.Job:
    """One train.py run under the timer, its log next to its result file."""
    path = result_path(args.out, recipe, seed)
    train = [sys.executable, str(ROOT / "train.py"), "--model", recipe, "--seed", str(seed),
             "--threads", str(args.threads), "--device", "cpu", "--metrics", str(path),
             "--no-save", "--quiet", *args.train_args]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--timed", str(path), "--", *train]
    return common.Job(f"{recipe} seed {seed}", cmd, path.with_suffix(".log"))


def timed(path: Path, command: list[str]) -> int:
    """Run `command` (a train.py run that writes its metrics to `path`), then add to that file
    the process's wall time and the machine. A Ctrl-C sent to this process alone (the batch's
    `kill -INT`) is passed on to the run, whose exit code is returned either way."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT)
    signal.signal(signal.SIGINT, lambda *_: proc.send_signal(signal.SIGINT))
    code = proc.wait()
    seconds = time.perf_counter() - start
    if code == 0:
        metrics = json.loads(Path(path).read_text())
        metrics.update(process_seconds=round(seconds, 3), machine=machine())
        text = json.dumps(metrics, indent=2) + "\n"
        outputs.atomic_write(path, lambda f: f.write(text.encode()))
    return code


def machine() -> dict[str, Any]:
    """The CPU a timing was taken on: its model name (Linux), its cores, the OS."""
    name = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        name = found.group(1).strip() if found else name
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "os": platform.platform()}


# ---------------------------------------------------------------------------------------------
# The report, from the result files alone.
# ---------------------------------------------------------------------------------------------
def load_results(out: str | os.PathLike = RESULTS) -> dict[str, dict[int, dict[str, Any]]]:
    """{recipe: {seed: result}} for every complete result file; others are skipped, said."""
    results: dict[str, dict[int, dict[str, Any]]] = {r: {} for r in RECIPES}
    for path in sorted(Path(out).glob("*_seed*.json")):
        found = re.fullmatch(r"(.+)_seed(\d+)\.json", path.name)
        if found and found.group(1) in results:
            if (metrics := common.load_result(path, NEEDS)) is not None:
                results[found.group(1)][int(found.group(2))] = metrics
    return results


@dataclass(frozen=True)
class Row:
    recipe: str
    parameters: int
    epochs: int
    threads: list[int]
    finals: dict[int, float]  # seed -> last epoch's test accuracy
    seconds: dict[int, float]  # seed -> the whole process's wall time


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> list[Row]:
    return [Row(name, next(iter(runs.values()))["parameters"],
                next(iter(runs.values()))["recipe"]["epochs"],
                sorted({r["threads"] for r in runs.values()}),
                {s: runs[s]["final_test_acc"] for s in sorted(runs)},
                {s: runs[s]["process_seconds"] for s in sorted(runs)})
            for name, runs in results.items() if runs]


def time_ratio(rows: list[Row]) -> float | None:
    """The compact recipe's mean process time over the speedrun's, on the seeds both ran."""
    by_name = {r.recipe: r for r in rows}
    if not {"speedrun", "compact"} <= set(by_name):
        return None
    fast, slow = by_name["speedrun"].seconds, by_name["compact"].seconds
    paired = sorted(set(fast) & set(slow))
    if not paired:
        return None
    return statistics.mean(slow[s] for s in paired) / statistics.mean(fast[s] for s in paired)


def format_table(rows: list[Row]) -> str:
    """The rows as Markdown, then the time ratio: final = the last epoch's test accuracy."""
    lines = ["| recipe | parameters | epochs | threads | seeds | final acc % per seed | min "
             "| mean | process s per seed | mean s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        finals = ", ".join(f"{a:.2f}" for a in r.finals.values())
        secs = ", ".join(f"{s:.1f}" for s in r.seconds.values())
        lines.append(f"| {r.recipe} | {r.parameters:,} | {r.epochs} "
                     f"| {', '.join(map(str, r.threads))} | {', '.join(map(str, r.finals))} "
                     f"| {finals} | {min(r.finals.values()):.2f} "
                     f"| {statistics.mean(r.finals.values()):.3f} | {secs} "
                     f"| {statistics.mean(r.seconds.values()):.1f} |")
    ratio = time_ratio(rows)
    if ratio is not None:
        lines += ["", f"time ratio (compact / speedrun, mean process seconds on the seeds both "
                      f"ran): {ratio:.2f}x"]
    return "\n".join(lines)


@legible
def plot_speedrun(results: dict[str, dict[int, dict[str, Any]]],
                  path: str | os.PathLike | None = FIGURE) -> Any:
    """Test accuracy after each epoch against the seconds since the process started, every
    seed of each recipe; each run ends at its process's last second (a cross)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, runs in results.items():
        for i, (_seed, m) in enumerate(sorted(runs.items())):
            xs, ys = elapsed(m), m["history"]["test_acc"]
            ax.plot(xs, ys, "o-", color=COLOURS.get(name), alpha=0.75, markersize=3,
                    label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
                    if i == 0 else None)
            ax.plot([m["process_seconds"]], [ys[-1]], "x", color=COLOURS.get(name))
    ax.axhline(TARGET_ACC, color="tab:red", linestyle="--", linewidth=1,
               label=f"target {TARGET_ACC}%")
    ax.set_ylim(98.0, 99.8)
    ax.set(xlabel="seconds since the process started", ylabel="test accuracy (%)",
           title="Test accuracy against time, every seed (x: the process ends)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return finish(fig, path)


def elapsed(metrics: dict[str, Any]) -> list[float]:
    """When each epoch ended, in seconds since the process started: its epochs' own seconds
    (training and test pass), after the process's time outside them (start-up, data) first."""
    seconds = metrics["history"]["seconds"]
    outside = max(0.0, metrics["process_seconds"] - sum(seconds))
    ends, total = [], outside
    for s in seconds:
        total += s
        ends.append(total)
    return ends


def report(out: str | os.PathLike = RESULTS, figure: str | os.PathLike | None = FIGURE) -> str:
    """The table and ratio; the figure is drawn into `figure` when there are results."""
    import matplotlib.pyplot as plt

    results = load_results(out)
    if any(results.values()) and figure is not None:
        plt.close(plot_speedrun(results, figure))
    return format_table(summarise(results))


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--threads", type=common.positive_int, default=2,
                   help="threads of every run (default: 2, the issue's laptop)")
    p.add_argument("--out", type=common.out_folder, default=RESULTS,
                   help="folder of the result files")
    p.add_argument("--figure", type=Path, default=None,
                   help=f"where the figure is drawn (default: {FIGURE} for the default --out, "
                        "speedrun.png in any other --out)")
    p.add_argument("--force", action="store_true", help="re-run runs that already have results")
    p.add_argument("--report", action="store_true",
                   help="run nothing: print the table and draw the figure from --out")
    p.add_argument("--timed", type=Path, help=argparse.SUPPRESS)  # one run under the timer
    p.add_argument("train_args", nargs="*", help="more train.py flags, after -- (e.g. "
                   "--limit-train 256 for a quick check)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.timed:
        return timed(args.timed, args.train_args)
    # A private --out draws its own figure: never over the committed one of the default's.
    args.figure = args.figure or (FIGURE if args.out == RESULTS else args.out / FIGURE.name)
    failed = 0
    if args.report:
        common.report_folder(args.out, RESULTS)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        todo = common.pending(list(RECIPES), args.seeds,
                              lambda name, seed: result_path(args.out, name, seed), NEEDS,
                              args.force)
        # One run at a time: a timing shares the machine with nothing of this batch.
        failed = common.run_all([job(r, s, args) for r, s in todo], 1, args.threads)
        if failed is None:
            return 130
    print(report(args.out, args.figure))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
