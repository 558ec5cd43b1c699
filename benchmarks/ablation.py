"""What each part of the recipe buys: train it with one ingredient changed at a time.

Each run is a plain `python train.py --seed N <the variant's flags> --metrics
results/ablation/<variant>_seed<N>.json --no-save --quiet`, so any row can be reproduced on its
own. Runs whose JSON is complete are skipped (delete the file, or pass --force), so an
interrupted batch continues where it stopped; Ctrl-C stops the runs in flight and says which
finished. `--report` rebuilds the table and the two figures (images/ablation.png, and
images/parameters.png: accuracy against parameters) from the JSON files alone, skipping a file
it cannot use with a warning naming it; the notebook imports `load_results`, `summarise` and
`format_table`, `plot_ablation` and `plot_parameters` from here to show the same.

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

from benchmarks import common, compact, tiny  # noqa: E402
from support.figures import TARGET_ACC, finish, legible  # noqa: E402

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


# ---------------------------------------------------------------------------------------------
# The figures, from the results alone: {variant: {seed: metrics}}, where metrics is what
# train.py --metrics writes.
# ---------------------------------------------------------------------------------------------
@legible
def plot_ablation(results: dict[str, dict[int, dict[str, Any]]],
                  path: str | os.PathLike | None = None) -> Any:
    """Final test accuracy per variant, each seed a dot and the mean a bar, against 99.4%."""
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    for y, name in enumerate(names):
        finals = [m["final_test_acc"] for m in results[name].values()]
        if finals:
            # Seeds spread a little up and down, so that equal accuracies stay visible as dots.
            ax.plot(finals, [y + 0.2 * d for d in _spread(len(finals))], "o", color="tab:blue",
                    alpha=0.7)
            ax.plot([sum(finals) / len(finals)] * 2, [y - 0.3, y + 0.3], "-", color="black")
        else:
            ax.annotate("no results yet", (0.02, y), xycoords=("axes fraction", "data"),
                        va="center", color="grey")
    ax.axvline(TARGET_ACC, color="tab:red", linestyle="--", label=f"target {TARGET_ACC}%")
    ax.set_yticks(range(len(names)), names)
    # The recipe on top, and half a row's room below the last, whose "no results yet" would
    # otherwise sit on the axis.
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set(xlabel="final test accuracy (%), each dot a seed, the bar their mean",
           title="What each part buys: the recipe with one ingredient changed")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best")  # where it covers the fewest dots
    return finish(fig, path)


def _spread(n: int) -> list[float]:
    """n offsets from -0.5 to 0.5 (0 for one): a variant's seeds side by side, not on top."""
    return [i / (n - 1) - 0.5 if n > 1 else 0.0 for i in range(n)]


# Published single runs by other people, for plot_parameters: parameters as (low, high), equal
# for one model; test accuracy in %; and the epoch it was reached at.
PUBLISHED_RUNS = (
    # The course's reference solution to this assignment (Session 6).
    {"label": "course reference", "parameters": (8_932, 8_932), "test_acc": 99.50,
     "epochs": "epoch 15 of 15"},
    # github.com/deepanshudashora/ERAV1, session6/part2/README.md (its training log).
    {"label": "deepanshudashora/ERAV1", "parameters": (9_404, 9_404), "test_acc": 99.52,
     "epochs": "epoch 20"},
    # The next session's assignment (99.4% in at most 15 epochs), as peers met it.
    {"label": "next session's target\nmet by peers", "parameters": (7_070, 7_979),
     "test_acc": 99.4, "epochs": "<= 15 epochs"},
)
# The smallest published 99.4%s (issue 38), each a single run of one seed: for plot_parameters,
# next to the tiny model's five seeds; "at" is where its name goes, in points from the star.
SMALLEST_PUBLISHED = (
    # A notebook in github.com/adilsammar/woolly-of-cv: batch 32, OneCycle, 15 epochs.
    {"label": "adilsammar/woolly-of-cv", "parameters": 3_762, "test_acc": 99.52,
     "epochs": ", 15 epochs", "at": (0, -12)},
    {"label": "public", "parameters": 4_838, "test_acc": 99.42, "epochs": ", its peak epoch",
     "at": (0, -52)},
    {"label": "public", "parameters": 5_854, "test_acc": 99.40, "epochs": "", "at": (0, 10)},
)
PARAMETER_SWEEP = "width-"  # the variants that scale every channel count: width-0.85, ...
GAP_HEAD = "gap-head"
COMPACT_NAME = "compact"  # the compact model's named recipe, in the figure and the table
TINY_NAME = "tiny"  # the tiny model's named recipe, in the figure


@legible
def plot_parameters(results: dict[str, dict[int, dict[str, Any]]],
                    path: str | os.PathLike | None = None,
                    compact_runs: dict[int, dict[str, Any]] | None = None,
                    tiny_runs: dict[int, dict[str, Any]] | None = None) -> Any:
    """How many parameters does 99.4% need? Final test accuracy against parameters (log scale).

    A dot per seed for the recipe and its narrower widths (the variants named width-*), their
    means joined by a line; the gap-head variant apart; the compact model's named recipe
    (`compact_runs`, benchmarks/compact.py's KEPT candidate) and the tiny model's
    (`tiny_runs`, benchmarks/tiny.py's), the other families; the dashed 99.4% target; and,
    marked as such, single runs other people published (PUBLISHED_RUNS, SMALLEST_PUBLISHED).
    """
    import matplotlib.pyplot as plt

    # Wide: the log axis spans 3,000 to 20,000 parameters, and each family is named over it.
    fig, ax = plt.subplots(figsize=(11, 6.5))
    sweep = {n: r for n, r in results.items()
             if r and (n == "recipe" or n.startswith(PARAMETER_SWEEP))}
    means = _seed_dots(ax, sweep, "o", "tab:blue", "our runs, a dot per seed")
    levels = _name_variants(ax, {**sweep, GAP_HEAD: results.get(GAP_HEAD),
                                 COMPACT_NAME: compact_runs, TINY_NAME: tiny_runs})
    if means:
        xs, ys = zip(*sorted(means), strict=True)
        ax.plot(xs, ys, "-_", color="black", linewidth=1.2, markersize=16, markeredgewidth=2,
                label="mean over seeds")
    else:
        ax.annotate("no results yet for the recipe's widths", (0.5, 0.5), ha="center",
                    xycoords="axes fraction", color="grey")
    if results.get(GAP_HEAD):
        (params, mean), = _seed_dots(ax, {GAP_HEAD: results[GAP_HEAD]}, "^", "tab:green",
                                     "gap head, a dot per seed")
        ax.plot([params], [mean], "_", color="black", markersize=16, markeredgewidth=2)
    if compact_runs:
        (params, mean), = _seed_dots(ax, {COMPACT_NAME: compact_runs}, "D", "tab:orange",
                                     "compact model, 15 epochs, a dot per seed")
        ax.plot([params], [mean], "_", color="black", markersize=16, markeredgewidth=2)
    if tiny_runs:
        (params, mean), = _seed_dots(ax, {TINY_NAME: tiny_runs}, "s", "tab:brown",
                                     "tiny model, 15 epochs, a dot per seed")
        ax.plot([params], [mean], "_", color="black", markersize=16, markeredgewidth=2)
    _published(ax)
    _smallest_published(ax)
    ax.axhline(TARGET_ACC, color="tab:red", linestyle="--", linewidth=1,
               label=f"target {TARGET_ACC}%")
    _parameter_axis(ax)
    ax.set_ylabel("final test accuracy (%)")
    # over the variants' names
    ax.set_title("How many parameters does 99.4% need?", pad=34 + 28 * levels)
    ax.margins(x=0.08, y=0.15)  # room for the names under the dots and over the stars
    ax.grid(alpha=0.3)
    # Below the axes: inside, "best" still hid a published star.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=10)
    return finish(fig, path)


def _seed_dots(ax: Any, runs: dict[str, dict[int, dict[str, Any]]], marker: str, colour: str,
               label: str) -> list[tuple[float, float]]:
    """One dot per seed at its variant's parameter count; returns each variant's (parameters,
    mean)."""
    xs, ys, means = [], [], []
    for by_seed in runs.values():
        ms = [by_seed[s] for s in sorted(by_seed)]
        params = ms[0]["parameters"]
        finals = [m["final_test_acc"] for m in ms]
        # Seeds side by side (4% apart at most), so that equal accuracies stay visible as dots.
        xs += [params * (1 + 0.04 * d) for d in _spread(len(ms))]
        ys += finals
        means.append((params, sum(finals) / len(finals)))
    ax.plot(xs, ys, marker, linestyle="none", color=colour, markersize=7, label=label)
    return means


def _published(ax: Any) -> None:
    """PUBLISHED_RUNS: a star per published model, a bar for a range of them, each named."""
    singles = [r for r in PUBLISHED_RUNS if r["parameters"][0] == r["parameters"][1]]
    ax.plot([r["parameters"][0] for r in singles], [r["test_acc"] for r in singles], "*",
            linestyle="none", color="tab:purple", markersize=15,
            label="published by others (single runs)")
    # The two stars are close: the first named under it (above and to its left stand the
    # compact model's dots), the other above and to its right.
    for r, (dx, dy, ha, va) in zip(singles, ((-6, -10, "center", "top"),
                                             (8, 6, "left", "bottom")), strict=False):
        ax.annotate(f"{r['label']}\n{r['parameters'][0]:,}: {r['test_acc']:.2f}%\n"
                    f"({r['epochs']})", (r["parameters"][0], r["test_acc"]),
                    textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=10,
                    color="tab:purple")
    for r in PUBLISHED_RUNS:
        low, high = r["parameters"]
        if low == high:
            continue
        ax.plot([low, high], [r["test_acc"]] * 2, "-", color="tab:purple", linewidth=8,
                solid_capstyle="butt", alpha=0.5)
        # Well under its bar, with a line to it: around the bar stand the runs near 99.4%
        # that it is compared with.
        centre = (low * high) ** 0.5
        ax.annotate(f"{r['label']}: {low:,}-{high:,}\n({r['epochs']})",
                    (centre, r["test_acc"]), xytext=(centre * 1.1, r["test_acc"] - 0.1),
                    ha="center", va="top", fontsize=10, color="tab:purple",
                    arrowprops={"arrowstyle": "-", "color": "tab:purple", "linewidth": 0.8})


def _smallest_published(ax: Any) -> None:
    """SMALLEST_PUBLISHED: a hollow star per run, each named as a single run."""
    ax.plot([r["parameters"] for r in SMALLEST_PUBLISHED],
            [r["test_acc"] for r in SMALLEST_PUBLISHED], "*", linestyle="none",
            markerfacecolor="none", color="tab:purple", markersize=15,
            label="smallest published (single runs)")
    for r in SMALLEST_PUBLISHED:
        dx, dy = r["at"]
        ax.annotate(f"{r['label']}\n{r['parameters']:,}: {r['test_acc']:.2f}%\n"
                    f"(single run{r['epochs']})", (r["parameters"], r["test_acc"]),
                    textcoords="offset points", xytext=(dx, dy),
                    ha="left" if dx > 0 else "center",
                    va="center" if dy == 0 else "bottom" if dy > 0 else "top", fontsize=9,
                    color="tab:purple")


def _name_variants(ax: Any, runs: dict[str, dict[int, dict[str, Any]] | None]) -> int:
    """Each variant's name and parameter count over the axes, above its dots: names next to
    the dots would collide with them. A name within 30% of the previous one's parameters goes
    a level higher, so the two do not overlap; returns the number of levels above the first."""
    placed = sorted((next(iter(by_seed.values()))["parameters"], name)
                    for name, by_seed in runs.items() if by_seed)
    level, levels, last = 0, 0, None
    for params, name in placed:
        level = 1 - level if last is not None and params < last * 1.3 else 0
        levels, last = max(levels, level), params
        ax.annotate(f"{name}\n{params:,}", (params, 1), xycoords=("data", "axes fraction"),
                    xytext=(0, 4 + 28 * level), textcoords="offset points", ha="center",
                    va="bottom", fontsize=10, color="dimgrey")
    return levels


def _parameter_axis(ax: Any) -> None:
    """Log scale, ticks at round parameter counts written out in full."""
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([3_000, 4_000, 5_000, 7_000, 10_000, 15_000,
                                             20_000, 30_000]))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("parameters (log scale)")


def compact_runs(out: str | os.PathLike = compact.RESULTS) -> dict[int, dict[str, Any]]:
    """The compact model's named recipe's runs ({seed: metrics}; {} before any)."""
    return compact.load_results(out).get(compact.KEPT, {})


def tiny_runs(out: str | os.PathLike = tiny.RESULTS) -> dict[int, dict[str, Any]]:
    """The tiny model's named recipe's runs ({seed: metrics}; {} before any)."""
    return tiny.load_results(out).get(tiny.KEPT, {})


def parameters_table(results: dict[str, dict[int, dict[str, Any]]],
                     compact: dict[int, dict[str, Any]] | None = None) -> str:
    """How many parameters does 99.4% need, as Markdown: the write-up's table scaled by width,
    its GAP head, and the compact model, each with every seed's final (last-epoch) accuracy."""
    lines = ["| model | parameters | epochs | seeds | final test accuracy, each seed | mean "
             "| seeds ≥ 99.4% | final train accuracy (mean) |", "|---|---|---|---|---|---|---|---|"]
    families = [(f"`{n}`" if n != "recipe" else "the table (`recipe`)", results.get(n))
                for n in ("recipe", "width-0.85", "width-0.7", "width-0.55", GAP_HEAD)]
    families.append(("compact (`--model compact`)", compact))
    for label, runs in families:
        if not runs:
            continue
        ms = [runs[s] for s in sorted(runs)]
        finals = [m["final_test_acc"] for m in ms]
        lines.append(f"| {label} | {ms[0]['parameters']:,} | {len(ms[0]['history']['epoch'])} "
                     f"| {len(ms)} | {', '.join(f'{a:.2f}' for a in finals)} "
                     f"| {statistics.mean(finals):.2f} "
                     f"| {sum(a >= TARGET_ACC for a in finals)} "
                     f"| {statistics.mean(m['history']['train_acc'][-1] for m in ms):.2f} |")
    return "\n".join(lines)


def report(out: str | os.PathLike = RESULTS, figure: str | os.PathLike | None = FIGURE,
           parameters_figure: str | os.PathLike | None = None,
           compact_out: str | os.PathLike = compact.RESULTS) -> str:
    """The tables as Markdown (what each part buys, then how many parameters 99.4% needs); the
    figures are written where given, and closed."""
    import matplotlib.pyplot as plt

    results, kept = load_results(out), compact_runs(compact_out)
    plt.close(plot_ablation(results, figure))
    plt.close(plot_parameters(results, parameters_figure, kept, tiny_runs()))
    return f"{format_table(summarise(results))}\n\n{parameters_table(results, kept)}"


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
    p.add_argument("--out", type=common.out_folder, default=RESULTS,
                   help="folder of the JSON files")
    p.add_argument("--figure", type=Path, default=None,
                   help=f"where the ablation's figure is written (default: {FIGURE} for the "
                        "default --out, ablation.png in any other --out)")
    p.add_argument("--parameters-figure", type=Path, default=None,
                   help="where the accuracy-against-parameters figure is written (default: "
                        f"{PARAMETERS_FIGURE} next to --figure)")
    p.add_argument("--force", action="store_true", help="re-run runs that already have results")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rebuild the table and the figures from --out")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = p.parse_args(argv)
    args.threads = args.threads or common.default_threads(args.jobs)
    # A private --out draws its own figures: never over the committed ones of the default's.
    args.figure = args.figure or (FIGURE if args.out == RESULTS else args.out / FIGURE.name)
    args.parameters_figure = args.parameters_figure or args.figure.with_name(PARAMETERS_FIGURE)
    return args


def to_run(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(variant, seed) of each run still to do, seed by seed (common.pending)."""
    return common.pending(args.variants, args.seeds,
                          lambda variant, seed: metrics_path(args.out, variant, seed), NEEDS,
                          args.force)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # a script: draw into files, never a window
    args = parse_args(argv)
    failed = 0
    if args.report:
        common.report_folder(args.out, RESULTS)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        failed = common.run_all([job(v, s, args) for v, s in to_run(args)], args.jobs,
                                args.threads)
        if failed is None:
            return 130
    print(report(args.out, args.figure, args.parameters_figure))
    print(f"figures: {args.figure}, {args.parameters_figure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
