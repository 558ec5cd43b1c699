"""The search for the tiny model (issue 38; docs/tiny.md): each candidate a set of train.py
flags on `--model tiny`, run for several seeds; the bar is every seed's last epoch >= 99.40%.

Each run is a plain `python train.py --seed N <the candidate's flags> --metrics
results/tiny/<candidate>_seed<N>.json --no-save --quiet`, so any row can be reproduced on its
own. Every candidate spells out all of its recipe (width, epochs, batch, schedule, peak lr,
Nesterov, dropout, augmentation), so a result never depends on what the TINY recipe says
today. Runs whose JSON is complete are skipped (delete the file, or pass --force). `--report`
prints the table from the JSON files alone: per candidate the parameters, the seeds, each
seed's final (last-epoch) test accuracy, their mean, sd and min, and the best epoch's accuracy
(shown, never used to choose).

The first search (TinyNet's first plan, 6-8-10-11-12 channels, 3,608 parameters, at commit
66eb493) ran seed 1 at batch 64 (peak 0.1) and batch 32 (peak 0.05), then seeds 2-5 of batch
32: 99.01-99.23%, short of the bar, with a training accuracy of 98% (it underfits). Its result
files are kept as plan1-<candidate>_seed<N>.json; its candidates are gone from CANDIDATES, as
TinyNet no longer builds that plan (check out 66eb493 to rerun them).

The second search's rule, written here before its first run. TinyNet's plan is now 6-8 | 10-10
| 12, then a 1x1 widening to 16 averages (3,672 parameters). Every run: `nice -n 19`, one
thread, two at a time on the shared 2-core machine:
1. Seed 1 of t2-lr0.05 (the first search's recipe, so only the plan changes) and t2-lr0.1 (a
   higher OneCycle peak for a model that underfits).
2. The one with the higher seed-1 final accuracy (a tie: the lower lr) gets seeds 2 to 5 and
   is the TINY recipe (KEPT), whatever those seeds give: no candidate is dropped or swapped
   for a bad later seed, and no epoch but the last is looked at. Seeds still running at the
   deadline are reported as running, not guessed.
3. Only if a slot is free after step 2: seed 1 of t2-lr0.2 (a higher peak still), then of
   t2-lr0.1-both (the original's 10% crop-resize added to the rotation).
(The first draft gave step 1 all four candidates; in the first minute the two runs got a
quarter of a core each, about 45-60 minutes a run, so it was cut to the above before any run
had ended, the two runs going on.)

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/tiny.py --candidates t2-lr0.05 t2-lr0.1 \\
        --seeds 1 --jobs 2 --threads 1 -- --threads 1
    python benchmarks/tiny.py --report
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, it sees only benchmarks/
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

RESULTS = ROOT / "results" / "tiny"
NEEDS = common.Needs(("parameters", "final_test_acc"), columns=("epoch", "test_acc"))
BAR = 99.40  # the issue's: every seed's last epoch
SEEDS_TO_PASS = 5


@dataclass(frozen=True)
class Candidate:
    """train.py flags of one candidate ({flag: value}), and what it tries."""

    flags: dict[str, str]
    idea: str


def _tiny(width: str = "1.0", batch: str = "64", lr: str = "0.1", dropout: str = "0.02",
          augmentation: str = "rotate", epochs: str = "15") -> dict[str, str]:
    return {"--model": "tiny", "--width": width, "--epochs": epochs, "--batch-size": batch,
            "--schedule": "onecycle-batch", "--lr": lr, "--nesterov": "", "--dropout": dropout,
            "--augmentation": augmentation}


CANDIDATES: dict[str, Candidate] = {
    "t2-lr0.05": Candidate(_tiny(batch="32", lr="0.05"),
                           "TinyNet (3,672 parameters) with the first search's recipe: batch 32, "
                           "per-batch OneCycle to 0.05, Nesterov, rotation"),
    "t2-lr0.1": Candidate(_tiny(batch="32", lr="0.1"), "the same, peak lr 0.1"),
    "t2-lr0.2": Candidate(_tiny(batch="32", lr="0.2"), "the same, peak lr 0.2"),
    "t2-lr0.1-both": Candidate(_tiny(batch="32", lr="0.1", augmentation="both"),
                               "peak 0.1, the original's crop-resize as well as the rotation"),
}

KEPT = "t2-lr0.05"  # the candidate support/recipe.py's TINY is (the search rule's step 2)


def train_flags(candidate: str) -> list[str]:
    """The candidate's flags as train.py arguments; a flag with no value is a switch."""
    flags: list[str] = []
    for flag, value in CANDIDATES[candidate].flags.items():
        flags += [flag, value] if value else [flag]
    return flags


def metrics_path(out: Path, candidate: str, seed: int) -> Path:
    return Path(out) / f"{candidate}_seed{seed}.json"


def job(candidate: str, seed: int, args: argparse.Namespace) -> common.Job:
    """One train.py run, its log next to its JSON."""
    path = metrics_path(args.out, candidate, seed)
    cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed),
           *train_flags(candidate), "--metrics", str(path), "--no-save", "--quiet",
           *args.train_args]
    return common.Job(f"{candidate} seed {seed}", cmd, path.with_suffix(".log"))


# ---------------------------------------------------------------------------------------------
# The report, from the JSON files alone.
# ---------------------------------------------------------------------------------------------
def load_results(out: str | os.PathLike = RESULTS) -> dict[str, dict[int, dict[str, Any]]]:
    """{candidate: {seed: train.py's metrics}} for every candidate with a result file; a file
    the report cannot use is skipped with a warning."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(Path(out).glob("*_seed*.json")):
        found = re.fullmatch(r"(.+)_seed(\d+)\.json", path.name)
        if found and (metrics := common.load_result(path, NEEDS)) is not None:
            results.setdefault(found.group(1), {})[int(found.group(2))] = metrics
    order = [c for c in CANDIDATES if c in results] + sorted(set(results) - set(CANDIDATES))
    return {name: results[name] for name in order}


@dataclass(frozen=True)
class Row:
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

    @property
    def all_at_bar(self) -> bool:
        return min(self.finals.values()) >= BAR

    @property
    def verdict(self) -> str:
        if not self.all_at_bar:
            return "not met"
        return "met" if len(self.finals) >= SEEDS_TO_PASS else f"so far ({len(self.finals)} seeds)"


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> list[Row]:
    return [Row(name, next(iter(runs.values()))["parameters"],
                {s: runs[s]["final_test_acc"] for s in sorted(runs)},
                {s: max(runs[s]["history"]["test_acc"]) for s in sorted(runs)})
            for name, runs in results.items() if runs]


def format_table(rows: list[Row]) -> str:
    """The rows as Markdown: final = the last epoch's test accuracy (the issue's measure)."""
    lines = ["| candidate | parameters | seeds | final acc % per seed | mean | sd | min "
             "| best epoch's acc % per seed | every seed >= 99.40 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = f"{r.sd:.3f}" if r.sd is not None else "–"
        finals = ", ".join(f"{a:.2f}" for a in r.finals.values())
        bests = ", ".join(f"{a:.2f}" for a in r.bests.values())
        lines.append(f"| {r.candidate} | {r.parameters:,} | {', '.join(map(str, r.finals))} "
                     f"| {finals} | {r.mean:.3f} | {sd} | {min(r.finals.values()):.2f} "
                     f"| {bests} | {r.verdict} |")
    return "\n".join(lines)


def report(out: str | os.PathLike = RESULTS) -> str:
    return format_table(summarise(load_results(out)))


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES),
                   choices=list(CANDIDATES))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--jobs", type=common.positive_int, default=1, help="runs at once")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="threads per run (default: cores/jobs)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON files")
    p.add_argument("--force", action="store_true", help="re-run runs that already have results")
    p.add_argument("--report", action="store_true",
                   help="run nothing: print the table from --out")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = p.parse_args(argv)
    args.threads = args.threads or common.default_threads(args.jobs)
    return args


def to_run(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(candidate, seed) of each run still to do, seed by seed (common.pending)."""
    return common.pending(args.candidates, args.seeds,
                          lambda name, seed: metrics_path(args.out, name, seed), NEEDS,
                          args.force)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = 0
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        failed = common.run_all([job(c, s, args) for c, s in to_run(args)], args.jobs,
                                args.threads)
        if failed is None:
            return 130
    print(report(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
