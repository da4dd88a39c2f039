"""The ownership lock of an output (a directory, or a file): one nas command at a time writes it. An exclusive
`fcntl.flock` the kernel drops when the process dies, re-entrant within a process and shared with the processes
it starts (a torchrun re-launch)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nas.errors import OutputError

LOCK_NAME = ".nas.lock"
HELD_ENV = "NAS_HELD_LOCKS"  # locks of a parent process (torchrun re-launch); its children share them
_held: dict[Path, list] = {}  # lock file -> [fd, depth, created its directory]: re-entrant within one process


def lock_file_of(path: str | os.PathLike, is_dir: bool = True) -> Path:
    """The lock file of an output: `.nas.lock` inside a directory output, `.<name>.lock` beside a file."""
    path = Path(path).expanduser().resolve()
    return path / LOCK_NAME if is_dir else path.parent / f".{path.name}.lock"


@contextmanager
def own_output(path: str | os.PathLike, is_dir: bool = True) -> Iterator[Path]:
    """Hold the output `path` for the block: an exclusive `fcntl.flock` on its lock file, which the kernel
    releases when the process dies (a kill never leaves a stale lock). A second command on the same output
    fails at once with an `OutputError` naming the holder's pid. Re-entrant within one process; processes
    started by the holder (it exports `NAS_HELD_LOCKS`) share its locks."""
    lock = lock_file_of(path, is_dir)
    inherited = str(lock) in os.environ.get(HELD_ENV, "").split(os.pathsep)
    if lock in _held or inherited:
        if lock in _held:
            _held[lock][1] += 1
        try:
            yield Path(path)
        finally:
            _release(lock)
        return
    _acquire(lock, path)
    try:
        yield Path(path)
    finally:
        _release(lock)


def _acquire(lock: Path, path: str | os.PathLike) -> None:
    created = not lock.parent.exists()
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{path} is in use by another nas command (pid {holder}); wait for it to finish, or "
                "choose another output"
            ) from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    with contextlib.suppress(OSError):  # the pid is for the message only (a full disk cannot hold it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[lock] = [fd, 1, created]
    os.environ[HELD_ENV] = os.pathsep.join(filter(None, [os.environ.get(HELD_ENV, ""), str(lock)]))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _release(lock: Path) -> None:
    """Drop one hold; the last removes the lock file (still locked, so no one else can hold the removed
    file: `_acquire` checks that the file it locked is still the one at the path) and, if the lock had
    created the output directory and it is empty, the directory (a failed command leaves nothing)."""
    if lock not in _held:
        return  # inherited from the parent process, which releases it
    _held[lock][1] -= 1
    if _held[lock][1] > 0:
        return
    fd, _, created = _held.pop(lock)
    lock.unlink(missing_ok=True)
    os.close(fd)  # closing the descriptor drops the flock
    if created:
        with contextlib.suppress(OSError):  # not empty: the command wrote its output there
            lock.parent.rmdir()
    held = [p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p and p != str(lock)]
    os.environ[HELD_ENV] = os.pathsep.join(held)
