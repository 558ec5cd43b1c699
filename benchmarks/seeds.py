"""Run the original recipe for several seeds and report the spread of test accuracy.

Each seed is a plain `python train.py --seed N --loader L --dropout-plan P --metrics
results/<name>_seed<N>.json`, so any row of the table can be reproduced on its own; <name> is
the loader, with `-dropout-<plan>` added for a model other than the write-up's table. Seeds whose
JSON is complete are not re-run (delete the file, or pass --force), so an interrupted batch
continues where it stopped; Ctrl-C stops the runs in flight and says which finished. `--report`
only prints the tables of what is there: one per kind of run, then all of them side by side
(a result file it cannot use is skipped, with a warning naming it).

    python benchmarks/seeds.py --seeds 1 2 3 4 5 --jobs 2 --threads 1
    python benchmarks/seeds.py --loader torchvision --seeds 1 2 3 --jobs 2 --threads 1
    python benchmarks/seeds.py --dropout-plan every --seeds 1 2 3 --jobs 2 --threads 1
    python benchmarks/seeds.py --report
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, it sees only benchmarks/
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NEEDS = common.Needs(("final_test_acc", "best_test_acc"))  # what the tables read


def run_name(loader: str, dropout_plan: str) -> str:
    """fast, torchvision, or e.g. fast-dropout-every for a model other than the table's."""
    return loader if dropout_plan == "table" else f"{loader}-dropout-{dropout_plan}"


def metrics_path(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}_seed{seed}.json"


def job(seed: int, args: argparse.Namespace) -> common.Job:
    path = metrics_path(args.out, args.name, seed)
    cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--loader", args.loader,
           "--dropout-plan", args.dropout_plan, "--metrics", str(path), "--no-save", "--quiet",
           *args.train_args]
    return common.Job(f"seed {seed}", cmd, path.with_suffix(".log"))


def load_runs(out: Path) -> dict[str, dict[int, dict]]:
    """{name: {seed: metrics}} of every usable results/<name>_seed<N>.json."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(out.glob("*_seed*.json")):
        match = re.fullmatch(r"(.+)_seed(\d+)\.json", path.name)
        if match and (metrics := common.load_result(path, NEEDS)) is not None:
            runs.setdefault(match[1], {})[int(match[2])] = metrics
    return runs


def summary(values: list[float]) -> tuple[str, str, str]:
    """Mean, sd and min, formatted; sd needs two values."""
    if not values:
        return "", "", ""
    sd = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.3f}", sd, f"{min(values):.2f}"


def side_by_side(runs: dict[str, dict[int, dict]], names: list[str]) -> str:
    """Final and best test accuracy per seed for each kind of run, with mean, sd and min."""
    seeds = sorted({s for name in names for s in runs.get(name, {})})
    head = " | ".join(f"{n} final | {n} best" for n in names)
    lines = [f"| seed | {head} |", "|---" * (1 + 2 * len(names)) + "|"]
    for seed in seeds:
        cells = []
        for name in names:
            m = runs.get(name, {}).get(seed)
            cells += ([f"{m['final_test_acc']:.2f}", f"{m['best_test_acc']:.2f}"] if m
                      else ["", ""])
        lines.append(f"| {seed} | {' | '.join(cells)} |")
    for label, index in (("mean", 0), ("sd", 1), ("min", 2)):
        cells = []
        for name in names:
            found = runs.get(name, {}).values()
            cells += [summary([m["final_test_acc"] for m in found])[index],
                      summary([m["best_test_acc"] for m in found])[index]]
        lines.append(f"| **{label}** | {' | '.join(cells)} |")
    return "\n".join(lines)


def ordered(runs: dict[str, dict[int, dict]]) -> list[str]:
    """The run names as the table shows them: fast, torchvision, then the rest by name."""
    return sorted(runs, key=lambda n: (n != "fast", n != "torchvision", n))


def report(out: Path) -> str:
    runs = load_runs(out)
    if not runs:
        return f"no results in {out}"
    names = ordered(runs)
    lines = []
    for name in names:
        finals = [m["final_test_acc"] for m in runs[name].values()]
        mean, sd, low = summary(finals)
        first = next(iter(runs[name].values()))
        lines.append(f"{name}: {len(finals)} seeds ({sorted(runs[name])}), model "
                     f"{first.get('model')}, commit {first.get('commit')}: final test accuracy "
                     f"mean {mean}%, sd {sd}, min {low}%")
    return "\n".join(lines) + "\n\n" + side_by_side(runs, names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--loader", default="fast", choices=["fast", "torchvision"])
    p.add_argument("--dropout-plan", default="table", choices=["table", "every", "none"])
    p.add_argument("--jobs", type=common.positive_int, default=1, help="runs at once")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="threads per run (default: cores/jobs)")
    p.add_argument("--out", type=common.out_folder, default=ROOT / "results")
    p.add_argument("--force", action="store_true", help="re-run seeds that already have results")
    p.add_argument("--report", action="store_true", help="only print the tables")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = p.parse_args(argv)
    args.threads = args.threads or common.default_threads(args.jobs)
    args.name = run_name(args.loader, args.dropout_plan)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = 0
    if args.report:
        common.report_folder(args.out, ROOT / "results")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        todo = [s for s in args.seeds if common.still_to_run(
            metrics_path(args.out, args.name, s), NEEDS, f"seed {s}", args.force)]
        failed = common.run_all([job(s, args) for s in todo], args.jobs, args.threads)
        if failed is None:
            return 130
    print(report(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
