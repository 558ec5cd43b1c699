"""The failures a user can cause or meet, recognised in the forms torch raises them.

train.py's error boundary turns each into one line that says what happened and what is on
disk; an exception that none of these recognises is a programming error and keeps its
traceback. Each looks through the whole chain of an exception (its cause and context, and
the exception an InductorError wraps), because torch often reports one failure as another:
a full disk during torch.save as RuntimeError "unexpected pos", with the OSError as context.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import torch

OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")
# What torch's zip writer says when a write to the file it was given failed.
FAILED_WRITE = ("unexpected pos", "file write failed")


def chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what it was raised from or during, each once."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "inner_exception", None))
                 if isinstance(x, BaseException)]


def write_failure(err: BaseException) -> str | None:
    """Why a write failed (disk full, no permission, ...), or None if `err` is not about a
    write: the OSError's words, else torch's writer's."""
    for e in chain(err):
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            return e.strerror or str(e)
    for e in chain(err):
        if isinstance(e, RuntimeError) and any(w in str(e) for w in FAILED_WRITE):
            return "the write failed (is the disk full?)"
    return None


def out_of_memory(err: BaseException) -> bool:
    """The device or the CPU ran out of memory: torch.OutOfMemoryError on CUDA and MPS,
    RuntimeError "DefaultCPUAllocator: can't allocate memory" on the CPU, or MemoryError."""
    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    return any(isinstance(e, (MemoryError, oom)) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in OUT_OF_MEMORY))
        for e in chain(err))


def while_testing(err: BaseException, test: Callable | None) -> bool:
    """`err` was raised inside `test` (utils.test, which train.py names: the test batches),
    not in a training step. Frames are matched by their code, not by a file's name."""
    if test is None:
        return False
    code = inspect.unwrap(test).__code__  # torch.inference_mode wraps it
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def missing_compiler(err: BaseException) -> str | None:
    """torch.compile's words when it found no working C++ compiler (Inductor's
    InvalidCxxCompiler, which most releases wrap in an InductorError), else None."""
    for e in chain(err):
        if type(e).__name__ == "InvalidCxxCompiler" or str(e).startswith("InvalidCxxCompiler"):
            return str(e).splitlines()[0].removeprefix("InvalidCxxCompiler: ")
    return None


class WriteFailed(RuntimeError):
    """A checkpoint or --metrics write failed for a reason the user can fix (disk full...)."""


def written(what: str, write: Callable[[], object]) -> None:
    """Run `write`; a failure that `write_failure` explains becomes WriteFailed("could not
    {what}: {reason}"), anything else (a bug) goes on as it is."""
    try:
        write()
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise WriteFailed(f"could not {what}: {reason}") from err
