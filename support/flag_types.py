"""The value types of train.py's flags, and their limits.

argparse calls each with the text the user gave; an ArgumentTypeError becomes argparse's own
one-line usage error (exit 2), naming the flag, so a bad value stops the run before any work
rather than as a traceback later. This module imports nothing heavy (no torch): the benchmark
drivers share MAX_INT with it.
"""

from __future__ import annotations

import argparse
import math

MAX_INT = 2**31 - 1  # far above any sensible size, and safe for every tensor index
MAX_THREADS = 1024  # more than any machine here has cores; each thread costs memory
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def positive_int(text: str, most: int = MAX_INT) -> int:
    value = int(text)
    if not 0 < value <= most:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {most:,}, got {text}")
    return value


def threads_int(text: str) -> int:
    return positive_int(text, MAX_THREADS)


def seed_int(text: str) -> int:
    value = int(text)
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    # Its own words, not non_negative_float's: "must be >= 0" for -1 would invite a 0 that
    # is refused in turn.
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def width_float(text: str) -> float:
    # Imported here, not at the top: model.py loads torch, which the benchmark drivers that
    # import this module for MAX_INT do not need (train.py has loaded it by the time argparse
    # calls this).
    from model import MAX_WIDTH

    value = positive_float(text)
    if value > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WIDTH:g}, got {text}")
    return value


def dropout_float(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1 (1 drops everything), got {text}")
    return value


def path_text(text: str) -> str:
    """An empty path would mean the current folder, or no flag at all (`--evaluate ""` used
    to start a training): refused."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# argparse names a value it cannot convert by its type's __name__ ("invalid positive_float
# value: '1/10'"): name each by what it wants instead.
for _type, _name in ((positive_int, "integer"), (threads_int, "integer"), (seed_int, "integer"),
                     (non_negative_float, "number"), (positive_float, "number"),
                     (width_float, "number"), (dropout_float, "number")):
    _type.__name__ = _name
