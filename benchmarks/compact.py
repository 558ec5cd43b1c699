"""The search for the compact model's recipe (issue 27; docs/compact.md): each candidate a set
of train.py flags on `--model compact`, run for several seeds.

Each run is a plain `python train.py --seed N <the candidate's flags> --metrics
results/compact/<candidate>_seed<N>.json --no-save --quiet`, so any row can be reproduced on
its own. Every candidate spells out all of its recipe (model, epochs, schedule, peak lr,
dropout, augmentation), so a result never depends on what the COMPACT recipe says today. Runs
whose JSON is complete are skipped (delete the file, or pass --force). `--report` prints the
table from the JSON files alone: per candidate the parameters, the seeds, each seed's final
(last-epoch) test accuracy, their mean, sd and min, and the best epoch's accuracy.

    nice -n 10 python benchmarks/compact.py --candidates d02-rotate-oc0.1 --seeds 1 2 \\
        --jobs 1 --threads 1 -- --threads 1
    python benchmarks/compact.py --report
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, it sees only benchmarks/
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.common import Candidate  # noqa: E402

RESULTS = ROOT / "results" / "compact"
BAR, MEAN_BAR = 99.40, 99.45  # the issue's: every seed's last epoch, and their mean


def _compact(dropout: str = "0.02", augmentation: str = "rotate", lr: str = "0.1",
             schedule: str = "onecycle", epochs: str = "15", **more: str) -> dict[str, str]:
    return {"--model": "compact", "--epochs": epochs, "--schedule": schedule, "--lr": lr,
            "--dropout": dropout, "--augmentation": augmentation, **more}


CANDIDATES: dict[str, Candidate] = {
    "d02-rotate-oc0.1": Candidate(
        _compact(), "the best exploratory run's recipe: dropout 0.02, rotation only, "
                    "OneCycle peak 0.1"),
    "d02-rotate-oc0.2": Candidate(
        _compact(lr="0.2"), "the same with twice the peak learning rate"),
    "d02-rotate-oc0.3": Candidate(
        _compact(lr="0.3"), "three times the peak: does the trend from 0.1 to 0.2 go on?"),
    "d05-rotate-oc0.1": Candidate(
        _compact(dropout="0.05"), "the same with dropout 0.05"),
    "d02-rotate-oc0.1-b64": Candidate(
        _compact(**{"--batch-size": "64"}), "the same with batch 64: twice the steps"),
}

KEPT = "d02-rotate-oc0.2"  # the candidate support/recipe.py's COMPACT is (docs/compact.md)


def train_flags(candidate: str) -> list[str]:
    return CANDIDATES[candidate].train_flags()


def load_results(out: str | os.PathLike = RESULTS) -> dict[str, dict[int, dict[str, Any]]]:
    """{candidate: {seed: train.py's metrics}} (common.load_search), CANDIDATES' order first."""
    return common.load_search(out, list(CANDIDATES))


@dataclass(frozen=True)
class Row(common.SearchRow):
    @property
    def passes(self) -> bool:
        return min(self.finals.values()) >= BAR and self.mean >= MEAN_BAR


def verdict(row: Row) -> str:
    seeds = "" if len(row.finals) >= 5 else f" so far ({len(row.finals)} seeds)"
    return ("met" if row.passes else "not met") + seeds


def report(out: str | os.PathLike = RESULTS) -> str:
    """The table from the JSON files alone: final = the last epoch's test accuracy."""
    return common.search_table(common.summarise_search(load_results(out), Row), "bar", verdict)


def main(argv: list[str] | None = None) -> int:
    args = common.search_args(__doc__, list(CANDIDATES), RESULTS, argv)
    return common.run_search(args, RESULTS, train_flags, report)


if __name__ == "__main__":
    sys.exit(main())
