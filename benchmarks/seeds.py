"""Run the original recipe for several seeds and report the spread of test accuracy.

Each seed is a plain `python train.py --seed N --metrics results/<loader>_seed<N>.json`, so any
row of the table can be reproduced on its own. Seeds whose JSON already exists are not re-run
(delete the file, or pass --force); `--report` only prints the table of what is there.

    python benchmarks/seeds.py --seeds 1 2 3 4 5 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_name(loader: str, dropout_plan: str) -> str:
    """fast, torchvision, or e.g. fast-dropout-every for a model other than the table's."""
    return loader if dropout_plan == "table" else f"{loader}-dropout-{dropout_plan}"


def metrics_path(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}_seed{seed}.json"


def run_seed(seed: int, args: argparse.Namespace) -> tuple[int, int]:
    path = metrics_path(args.out, args.name, seed)
    cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--loader", args.loader,
           "--dropout-plan", args.dropout_plan, "--metrics", str(path), "--no-save", "--quiet",
           *args.train_args]
    # Several runs share the cores: give each its own threads rather than let them fight.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = args.out / f"{args.name}_seed{seed}.log"
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    print(f"seed {seed}: exit {done.returncode}, log in {log}", flush=True)
    return seed, done.returncode


def report(out: Path, name: str, seeds: list[int]) -> str:
    rows, finals = [], []
    for seed in seeds:
        path = metrics_path(out, name, seed)
        if not path.exists():
            rows.append(f"| {seed} | missing | |")
            continue
        m = json.loads(path.read_text())
        finals.append(m["final_test_acc"])
        rows.append(f"| {seed} | {m['final_test_acc']:.2f} | {m['best_test_acc']:.2f} |")
    lines = [f"runs: {name}", "| seed | final test acc % | best test acc % |",
             "|---|---|---|", *rows]
    if finals:
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        mean = statistics.mean(finals)
        lines.append(f"final-epoch accuracy over {len(finals)} seeds: mean {mean:.3f}%, "
                     f"std {sd:.3f}, min {min(finals):.2f}%, max {max(finals):.2f}%")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--loader", default="fast", choices=["fast", "torchvision"])
    p.add_argument("--dropout-plan", default="table", choices=["table", "every", "none"])
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per run (default: cores/jobs)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--force", action="store_true", help="re-run seeds that already have results")
    p.add_argument("--report", action="store_true", help="only print the table")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.name = run_name(args.loader, args.dropout_plan)
    todo = [s for s in args.seeds
            if args.force or not metrics_path(args.out, args.name, s).exists()]
    failed = []
    if todo and not args.report:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            failed = [s for s, rc in pool.map(lambda s: run_seed(s, args), todo) if rc != 0]
    print(report(args.out, args.name, args.seeds))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
