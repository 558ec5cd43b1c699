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
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


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
            self.path.unlink(missing_ok=True)
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


def acquire(path: str | os.PathLike, wait: bool,
            on_wait: Callable[[int | None], None] | None = None) -> Lock:
    """Hold the lock file `path` (created, with its folder, if missing). Without `wait`, raise
    Busy at once if another process holds it; with `wait`, call `on_wait(pid)` once, then
    wait for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return _acquire_with_filelock(path, wait)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                if not wait:
                    raise Busy(path, _holder(fd))
                if on_wait is not None:
                    on_wait(_holder(fd))
                    on_wait = None
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path, fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return Lock(path, fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder before us deleted the file we locked: lock the new one


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
