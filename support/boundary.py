"""train.py's error boundary: how its command ended, what that prints, and the exit code.

    Ctrl-C, SIGTERM, SIGHUP     interrupted (...) while ...; then what is on disk   128 + signal
    a refused flag or path      train.py: error: ...  (flag_checks.refuse)           2
    stdout's reader gone        stopped: the output was closed; ...                  141
    a failure a user can meet   error: ...  (stopping.failure_message)               1
    anything else: a bug        its traceback                                        1

stopping.py and flag_checks.py word the messages; this module only decides which applies. It
sits beside stopping.py rather than in it because it catches flag_checks.UsageError, and
flag_checks builds its messages with stopping.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from support import stopping
from support.flag_checks import UsageError, refuse


def guarded(command: Callable[[], int], status: stopping.Status, then_exit: bool = False) -> int:
    """`command`'s exit code, or the one line and exit code of what stopped it; `status` says
    what it was doing. Signals stop it cleanly (stopping_on_signals); `then_exit` when the
    process ends after it."""
    line_buffered()
    with stopping.stopping_on_signals(then_exit):
        try:
            return command()
        except KeyboardInterrupt as err:
            return stopping.report_interrupt(err, status)
        except UsageError as err:
            refuse(str(err))
        except BrokenPipeError:
            return stopping.stop_quietly(status)
        except Exception as err:
            message = stopping.failure_message(err, status)
            if message is None:
                raise  # a bug: its traceback is what a fix needs
            return error(message)


def error(message: str) -> int:
    """A failure a user can cause or meet, on stderr: one line, exit code 1."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def line_buffered() -> None:
    """Each line reaches a pipe or a file when it is printed (`| tee log`, `> log` followed
    with tail -f): Python buffers a redirected stdout in 8 KB blocks otherwise."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
