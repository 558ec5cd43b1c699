"""The files a run writes: one policy for all of them, and the atomic write each goes through.

The policy, checked before any work (train.py applies it to --save-model and --metrics):

- an output names a file: not empty, not a folder, in a folder that can be written, under a
  name the file system accepts, for the final name and the temporary one alike;
- no two outputs name the same file, and no output is a file the run reads;
- an existing file is replaced only when it is the run's own (train.py says which: the
  checkpoint a --resume continues, a metrics file of train.py), or when the user says so.

Paths are compared and written as `target` resolves them, so the name checked is the name the
write uses (a symlink's target, not the link). `atomic_write` writes a temporary file in the
same folder, then renames it over the target: a crash or Ctrl-C mid-write leaves the previous
file whole, and a reader never sees half a file.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

SCRATCH_SUFFIX = ".partial"


class Refused(ValueError):
    """A path the policy refuses; the message is one line that names the flag and the fix."""


def user_path(path: str | os.PathLike) -> str:
    """The path a user means: `~` expanded, once, as a shell would (bash leaves the `~` of
    `--data-dir=~/d` as it is). Every path train.py, the notebook's helpers and the benchmarks
    take goes through it, so the file checked is the file read or written, and a message
    names a path that works when pasted."""
    return os.path.expanduser(os.fspath(path))


def odd_kind(path: str | os.PathLike) -> str | None:
    """What an existing `path` is when it is neither a regular file nor a folder ("a FIFO",
    a device...), else None: reading or replacing such a thing would hang or wipe it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")


def check_kind(flag: str, path: str | os.PathLike) -> None:
    """Refused (one line) where `path` exists as something else than a regular file or a
    folder (folders are the callers' to word)."""
    kind = odd_kind(path)
    if kind is not None:
        raise Refused(f"{flag} {path} is {kind}, not a regular file: give the path of a file")


def target(path: str | os.PathLike) -> Path:
    """The file a write of `path` replaces: absolute, with every symlink followed. A symlink
    loop is an OSError (ELOOP) whatever the Python: before 3.13, resolve raises RuntimeError."""
    try:
        return Path(path).resolve()
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path)) from None


# ---------------------------------------------------------------------------------------------
# The atomic write.
# ---------------------------------------------------------------------------------------------
def _scratch(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, named so that `scratch_files` finds it."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=SCRATCH_SUFFIX)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write` on a temporary file in `path`'s folder, flush it to disk, then rename it
    over `path`; on any failure (disk full, Ctrl-C) the temporary file is deleted and `path`
    is as it was."""
    path = target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _scratch(path)
    try:
        os.chmod(tmp, _mode_of(path))  # mkstemp's 0600 would hide it from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_of(path: Path) -> int:
    """The mode of the file replaced (a read-only checkpoint stays read-only), or what open()
    would give a new file: 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def scratch_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files of `atomic_write` for `path` that exist now: a write in progress,
    or one that was killed (SIGKILL, a power cut), since every other failure removes its own."""
    path = target(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{SCRATCH_SUFFIX}"))


# ---------------------------------------------------------------------------------------------
# The checks, before any work.
# ---------------------------------------------------------------------------------------------
def check_writable(flag: str, path: str, example: str) -> Path:
    """The target of output `path`, after making its folder and creating and deleting the
    temporary file a write would use; Refused (one line) if any of it fails."""
    try:
        if path.endswith(("/", os.sep)) or Path(path).is_dir():
            raise Refused(f"{flag} {path} is a folder; give a file path, such as "
                          f"{os.path.join(path, example)}")
        check_kind(flag, path)
        file = target(path)
        made = _missing_folders(file.parent)
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = _scratch(file)
            os.close(fd)
            os.unlink(tmp)
        finally:
            # The write makes them again; a run refused by a later check leaves none behind.
            for folder in made:
                folder.rmdir()
    except (FileExistsError, NotADirectoryError):
        raise Refused(f"{flag} {path} is not writable: a folder on its path is a file") from None
    except OSError as err:
        raise Refused(f"{flag} {path} is not writable: {err.strerror or err}") from None
    return file


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of `folder`'s path that do not exist yet, deepest first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def check_distinct(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """No two outputs share a file, and no output is an input; each dict maps a flag (or
    what an input is) to its path."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        file = target(path)
        if file in seen:
            raise Refused(f"{seen[file]} and {flag} name the same file {path}: give each its "
                          f"own path")
        seen[file] = flag
    for what, path in inputs.items():
        flag = seen.get(target(path))
        if flag is not None:
            raise Refused(f"{flag} {outputs[flag]} is {what}, which this run reads: an output "
                          f"must be another file")


def would_replace(path: str | os.PathLike, is_own: Callable[[Path], bool]) -> bool:
    """A write of `path` would replace an existing file that is not the run's own (`is_own`
    of its target); train.py then refuses unless given --force."""
    file = target(path)
    return os.path.lexists(file) and not is_own(file)
