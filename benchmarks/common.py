"""What the benchmark scripts share: argparse types, and reading train.py's result files.

A result file is usable when it is valid JSON, an object holding the numbers a report reads,
each finite, and a history whose columns have one length. seeds.py and ablation.py skip a file
that is not (naming it in one warning line), and count a run as done only when its file is
usable: a file left empty or cut short by a failed write is run again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_INT = 2**31 - 1  # as train.py: far above any sensible count


# ---------------------------------------------------------------------------------------------
# argparse types: a bad count is a one-line usage error (exit 2), not a traceback later.
# ---------------------------------------------------------------------------------------------
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
