"""What each part of the recipe buys: train it with one ingredient changed at a time.

Each run is a plain `python train.py --seed N <the variant's flags> --metrics
results/ablation/<variant>_seed<N>.json --no-save --quiet`, so any row can be reproduced on its
own. Runs whose JSON is complete are skipped (delete the file, or pass --force), so an
interrupted batch continues where it stopped; Ctrl-C stops the runs in flight and says which
finished. `--report` rebuilds the table and the two figures (images/ablation.png, and
images/parameters.png: accuracy against parameters) from the JSON files alone, skipping a file
it cannot use with a warning naming it; the notebook imports `load_results`, `summarise` and
`format_table` from here, and the figures' `plot_ablation` and `plot_parameters` from utils,
to show the same.

    python benchmarks/ablation.py --seeds 1 2 3 --jobs 2 --threads 1
    python benchmarks/ablation.py --report
    python benchmarks/ablation.py --variants no-dropout --seeds 1 -- --epochs 1  # extra flags
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
from utils import plot_ablation, plot_parameters  # noqa: E402

RESULTS = ROOT / "results" / "ablation"
FIGURE = ROOT / "images" / "ablation.png"
PARAMETERS_FIGURE = "parameters.png"  # written next to the ablation's figure unless told
# What the table and the figures read from a result file.
NEEDS = common.Needs(("parameters", "final_test_acc"), columns=("epoch", "test_acc", "train_acc"))


@dataclass(frozen=True)
class Variant:
    """train.py flags that change one ingredient ({flag: value}, None for a bare switch)."""

    flags: dict[str, str | None]
    change: str  # what differs from the recipe, for the table


VARIANTS: dict[str, Variant] = {
    "recipe": Variant({}, "nothing: the recipe as is"),
    "no-batchnorm": Variant({"--no-batch-norm": None}, "no BatchNorm (convs get a bias)"),
    "no-dropout": Variant({"--dropout-plan": "none"}, "no dropout"),
    "no-augmentation": Variant({"--augmentation": "none"}, "no crop-resize, no rotation"),
    "rotation-only": Variant({"--augmentation": "rotate"}, "rotation only (no crop-resize)"),
    "crop-only": Variant({"--augmentation": "crop"}, "crop-resize only (no rotation)"),
    "constant-lr": Variant({"--gamma": "1.0"}, "constant learning rate (no StepLR drop)"),
    "bare-transitions": Variant({"--transitions": "bare"}, "1x1 reductions without BN-ReLU"),
    "dropout-every": Variant({"--dropout-plan": "every"}, "dropout after every 3x3 block"),
    "gap-head": Variant({"--head": "gap"}, "global average pooling + 1x1 conv for conv6"),
    # The width sweep: the table's channels scaled (model.scaled_channels) to about 3/4, 1/2
    # and 1/3 of its parameters.
    "width-0.85": Variant({"--width": "0.85"}, "every channel count x 0.85"),
    "width-0.7": Variant({"--width": "0.7"}, "every channel count x 0.7"),
    "width-0.55": Variant({"--width": "0.55"}, "every channel count x 0.55"),
}


def train_flags(variant: str) -> list[str]:
    """The variant's flags as train.py arguments."""
    flags: list[str] = []
    for flag, value in VARIANTS[variant].flags.items():
        flags += [flag] if value is None else [flag, value]
    return flags


def metrics_path(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / f"{variant}_seed{seed}.json"


def job(variant: str, seed: int, args: argparse.Namespace) -> common.Job:
    """One train.py run, its log next to its JSON."""
    path = metrics_path(args.out, variant, seed)
    cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), *train_flags(variant),
           "--metrics", str(path), "--no-save", "--quiet", *args.train_args]
    return common.Job(f"{variant} seed {seed}", cmd, path.with_suffix(".log"))


# ---------------------------------------------------------------------------------------------
# The report, from the JSON files alone.
# ---------------------------------------------------------------------------------------------
def load_results(out: str | os.PathLike = RESULTS) -> dict[str, dict[int, dict[str, Any]]]:
    """{variant: {seed: train.py's metrics}} for every variant; {} where none has run yet.

    A file the report cannot use (cut short, NaN, a key missing) is skipped with a warning.
    """
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in VARIANTS}
    for name in VARIANTS:
        for path in sorted(Path(out).glob(f"{name}_seed*.json")):
            seed = re.fullmatch(rf"{re.escape(name)}_seed(\d+)\.json", path.name)
            if seed and (metrics := common.load_result(path, NEEDS)) is not None:
                results[name][int(seed.group(1))] = metrics
    return results


@dataclass(frozen=True)
class Row:
    variant: str
    change: str
    parameters: int | None
    seeds: list[int]
    mean_test: float | None
    sd_test: float | None  # None with fewer than two seeds
    mean_best_epoch: float | None  # the epoch of each run's best test accuracy, averaged
    mean_train: float | None  # final train accuracy: its gap to the test one shows overfitting


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> list[Row]:
    """One row per variant, in VARIANTS order; a variant with no runs has None in its numbers."""
    rows = []
    for name, runs in results.items():
        change = VARIANTS[name].change if name in VARIANTS else ""
        if not runs:
            rows.append(Row(name, change, None, [], None, None, None, None))
            continue
        ms = [runs[s] for s in sorted(runs)]
        finals = [m["final_test_acc"] for m in ms]
        best = [m["history"]["epoch"][_argmax(m["history"]["test_acc"])] for m in ms]
        rows.append(Row(name, change, ms[0]["parameters"], sorted(runs),
                        statistics.mean(finals),
                        statistics.stdev(finals) if len(finals) > 1 else None,
                        statistics.mean(best),
                        statistics.mean(m["history"]["train_acc"][-1] for m in ms)))
    return rows


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first best, on a tie


def format_table(rows: list[Row]) -> str:
    """The rows as Markdown, the form the README and the notebook show."""
    lines = ["| variant | what changes | parameters | seeds | final test acc % (mean) | sd "
             "| best epoch (mean) | final train acc % (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.seeds:
            lines.append(f"| {r.variant} | {r.change} | | 0 | missing | | | |")
            continue
        sd = f"{r.sd_test:.3f}" if r.sd_test is not None else "–"
        lines.append(f"| {r.variant} | {r.change} | {r.parameters:,} | {len(r.seeds)} "
                     f"| {r.mean_test:.2f} | {sd} | {r.mean_best_epoch:.1f} "
                     f"| {r.mean_train:.2f} |")
    return "\n".join(lines)


def report(out: str | os.PathLike = RESULTS, figure: str | os.PathLike | None = FIGURE,
           parameters_figure: str | os.PathLike | None = None) -> str:
    """The table as Markdown; the figures are written where given, and closed."""
    import matplotlib.pyplot as plt

    results = load_results(out)
    plt.close(plot_ablation(results, figure))
    plt.close(plot_parameters(results, parameters_figure))
    return format_table(summarise(results))


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--jobs", type=common.positive_int, default=1, help="runs at once")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="threads per run (default: cores/jobs)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON files")
    p.add_argument("--figure", type=Path, default=FIGURE,
                   help="where the ablation's figure is written")
    p.add_argument("--parameters-figure", type=Path, default=None,
                   help="where the accuracy-against-parameters figure is written (default: "
                        f"{PARAMETERS_FIGURE} next to --figure)")
    p.add_argument("--force", action="store_true", help="re-run runs that already have results")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rebuild the table and the figures from --out")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = p.parse_args(argv)
    args.threads = args.threads or common.default_threads(args.jobs)
    args.parameters_figure = args.parameters_figure or args.figure.with_name(PARAMETERS_FIGURE)
    return args


def to_run(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(variant, seed) of each run still to do: seed by seed, so that a batch stopped half-way
    leaves every variant with some seeds."""
    todo = []
    for seed in args.seeds:
        for variant in args.variants:
            label = f"{variant} seed {seed}"
            if common.still_to_run(metrics_path(args.out, variant, seed), NEEDS, label,
                                   args.force):
                todo.append((variant, seed))
            else:
                print(f"{label}: skipped, results exist", flush=True)
    return todo


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # a script: draw into files, never a window
    args = parse_args(argv)
    failed = []
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        todo = to_run(args)
        try:
            codes = common.run_batch([job(v, s, args) for v, s in todo], args.jobs,
                                     args.threads)
        except common.Interrupted as stop:
            print(stop, file=sys.stderr)
            return 130
        failed = [vs for vs, rc in zip(todo, codes, strict=True) if rc != 0]
    print(report(args.out, args.figure, args.parameters_figure))
    print(f"figures: {args.figure}, {args.parameters_figure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
