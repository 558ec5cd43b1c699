"""Ctrl-C while train.py starts: noted while torch loads, then a one-line stop.

Loading torch takes seconds, and a Ctrl-C then is the user's choice, not a crash. A
KeyboardInterrupt raised inside an import can be swallowed by a library's bare `except`, so
`hold_ctrl_c` (called before the imports) makes Ctrl-C only take note, and `release_ctrl_c`
(after them) restores Python's handler and, if Ctrl-C came meanwhile, stops with one line and
exit code 130. This module imports nothing heavy, so it is in place before torch loads.
"""

from __future__ import annotations

import signal
import sys

_pressed: list[int] = []  # the Ctrl-Cs noted while holding


def hold_ctrl_c() -> None:
    """Note Ctrl-C instead of raising it, unless SIGINT is not Python's own handler (a
    background job ignores it; that choice is kept)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda signum, frame: _pressed.append(signum))


def release_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt again (unless ignored); one noted meanwhile stops the
    process now, before anything was trained or saved."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _pressed:
        print("\ninterrupted (Ctrl-C) while starting; nothing was trained or saved.",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
