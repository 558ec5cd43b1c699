"""A lock between processes: a file beside what it guards, holding its holder's PID.

    lock = acquire(path, wait=False)   # Busy at once, naming the PID, if another holds it
    lock = acquire(path, wait=True)    # or wait for it to be released
    ...
    lock.release()

The kernel holds the lock (flock), so a holder that is killed, even with SIGKILL, frees it;
its file then holds no lock and the next process takes it over. A release deletes the file,
so a finished run leaves nothing behind. checkpoints.checkpoint_lock guards a checkpoint with
it, mnist_files.ensure_mnist a fetch into a data folder. Where there is no flock (Windows),
filelock's lock stands in, without the PID.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class Busy(RuntimeError):
    """Another process holds the lock; `pid` is None where it could not be read."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by {'PID ' + str(pid) if pid else 'another process'}")
        self.path, self.pid = path, pid


class Lock:
    """A held lock; `release` frees it and deletes its file."""

    def __init__(self, path: Path, fd: int | None = None, fallback: object = None) -> None:
        self.path, self._fd, self._fallback = path, fd, fallback

    def release(self) -> str | None:
        """Free the lock and delete its file; None, or why the file could not be deleted (its
        folder became read-only): it is then emptied, holds no lock, and the next `acquire`
        takes it over. Never raises: a release runs while another failure is being reported,
        and must not bury that report under its own traceback."""
        if self._fallback is not None:
            self._fallback.release()  # type: ignore[attr-defined]
            return None
        if self._fd is None:
            return None
        problem = None
        try:
            # Deleted while still held: a process that opened the file meanwhile finds, once it
            # gets the lock, that the path no longer names its file, and starts again.
            if _names(self.path, self._fd):  # never a file someone put in its place
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            problem = err.strerror or str(err)
            try:
                os.ftruncate(self._fd, 0)  # no PID: it no longer names a holder
            except OSError:
                pass
        finally:
            os.close(self._fd)
            self._fd = None
        return problem


class Unusable(RuntimeError):
    """The lock's path names something that is not a lock file of ours (a folder, a FIFO, a
    symlink, a user's file), or a stale one that cannot be removed; the message says what to
    do. The lock never writes to, truncates or deletes such a thing."""


def acquire(path: str | os.PathLike, wait: bool,
            on_wait: Callable[[int | None], None] | None = None) -> Lock:
    """Hold the lock file `path` (created, with its folder, if missing). Without `wait`, raise
    Busy at once if another process holds it; with `wait`, call `on_wait(pid)` once, then
    wait for it. Raise Unusable where `path` is not a lock file of ours."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return _acquire_with_filelock(path, wait)
    while True:
        fd = _create(path)
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # our new file: only a stale-lock check can hold it
                if _names(path, fd):
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return Lock(path, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            continue
        taken = _take_over(path, wait, on_wait)
        if taken is not None:
            return taken
        on_wait = None


def _create(path: Path) -> int | None:
    """A new lock file at `path`, created by us (never through a link), or None if a file of
    that name exists."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    except FileExistsError:
        return None
    except OSError as err:
        raise Unusable(f"cannot create the lock file {path} ({err.strerror or err}): make its "
                       f"folder writable, or use another path") from None


def _take_over(path: Path, wait: bool, on_wait: Callable[[int | None], None] | None
               ) -> Lock | None:
    """The existing file at `path`: Busy if a live holder has it; a stale lock of ours is
    removed (None: create a new one) or, where it cannot be, reused; anything else Unusable."""
    fd = _open_existing(path)
    if fd is None:
        return None  # gone meanwhile
    try:
        if not _try_lock(fd):
            if not wait:
                raise Busy(path, _holder(fd))
            if on_wait is not None:
                on_wait(_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        if not _names(path, fd):
            return None  # its holder deleted it on release: create ours
        _check_ours(path, fd)
        try:
            path.unlink()
        except OSError as err:
            return _reuse(path, fd, err)
        return None
    finally:
        os.close(fd)


def _open_existing(path: Path) -> int | None:
    """`path` opened without following a link or blocking on a FIFO, if it is a regular file."""
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(kind):
        raise Unusable(_not_a_lock(path, kind))
    for flags in (os.O_RDWR, os.O_RDONLY):  # a stale read-only file is still locked and read
        try:
            fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK)
            break
        except FileNotFoundError:
            return None
        except PermissionError:
            continue
        except OSError as err:
            raise Unusable(f"cannot open the lock file {path} ({err.strerror or err}): "
                           f"remove it (rm {path}) if no run is using it") from None
    else:
        raise Unusable(f"the lock file {path} cannot be read (permission denied): remove it "
                       f"(rm {path}) if no run is using it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the lstat
        os.close(fd)
        raise Unusable(_not_a_lock(path, os.lstat(path).st_mode))
    return fd


def _not_a_lock(path: Path, mode: int) -> str:
    kind = ("a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file")
    return (f"the lock file {path} is {kind}, which a lock never follows nor replaces: move "
            f"it away (mv {path} SOMEWHERE), or use another path")


def _check_ours(path: Path, fd: int) -> None:
    """What a lock leaves behind holds a PID or nothing; a user's file of that name is kept."""
    text = os.pread(fd, 64, 0)
    if text.strip() and not text.strip().isdigit():
        raise Unusable(f"{path} is not a lock file (it holds other text), and a lock never "
                       f"replaces it: move it away (mv {path} SOMEWHERE), or use another path")


def _reuse(path: Path, fd: int, why: OSError) -> Lock:
    """A stale lock file of ours that cannot be deleted (a read-only folder): held in place
    if it can be written, so the next run takes it over, as a release that could not delete
    it promises."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        raise Unusable(f"the lock file {path}, left by a stopped run, can be neither removed "
                       f"({why.strerror or why}) nor written: remove it (rm {path})") from None
    return Lock(path, os.dup(fd))


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _names(path: Path, fd: int) -> bool:
    """`path` still names the file open as `fd`."""
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int, tries: int = 20) -> int | None:
    """The PID in the lock file; a holder writes it just after taking the lock, so an empty
    file is read again for a moment."""
    for _ in range(tries):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def _acquire_with_filelock(path: Path, wait: bool) -> Lock:
    import filelock

    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        raise Busy(path, None) from None
    return Lock(path, fallback=lock)
