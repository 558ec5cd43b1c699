"""What the benchmark scripts share: argparse types for their counts, so that a bad one is a
one-line usage error (exit 2) before any work, as in train.py."""

from __future__ import annotations

import argparse

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
