"""One run per directory: ``titans train`` holds an exclusive lock on its ``out_dir``.

The lock is ``fcntl.flock`` on ``<out_dir>/.lock``, which the kernel releases when the holder
exits, however it exits: a second process pointed at the same directory is refused while the first
runs (and told its pid), and a directory whose holder was killed is taken over at once. The file
names the holder (pid and host) while it runs and is emptied on a clean exit, so a pid left in it
means the last run was killed: the next one says so, and removes the temporary directories an
interrupted checkpoint write leaves behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..io.files import printable

__all__ = ["RunLockError", "run_lock"]

LOCK_FILE = ".lock"


class RunLockError(UserError, RuntimeError):
    """Another process is training in this run directory."""


def _holder(fd: int) -> str:
    """Who the lock file names (``pid N on host``), as one printable line: the file may hold
    anything (a run directory received from someone else), which must not reach the terminal."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 256).decode("utf-8", errors="replace").strip()
    line = text.splitlines()[0] if text else ""
    clean = printable(line)
    return clean + (" ..." if line != text and not clean.endswith(" ...") else "")


def _remove_partial_checkpoints(out_dir: Path) -> list[str]:
    """Temporary directories of checkpoint writes that never finished (``checkpoints/.step-*``)."""
    root = out_dir / "checkpoints"
    removed = []
    if root.is_dir():
        for tmp in root.glob(".step-*"):
            if tmp.is_symlink():  # not a write of ours: remove the link, never what it points to
                tmp.unlink()
                removed.append(tmp.name)
            elif tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
    return removed


@contextmanager
def run_lock(out_dir: str | Path, log=print) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the duration of the block; ``RunLockError`` if a live process
    holds it."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # never through a link: the lock file is truncated and written, and a link (from a run
        # directory someone else made) could point at any file of the user's
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if (out_dir / LOCK_FILE).is_symlink():
            raise RunLockError(
                f"cannot use {out_dir} as a run directory: its {LOCK_FILE} is a symbolic link (to "
                f"{os.readlink(out_dir / LOCK_FILE)}), which titans never writes through; remove the link"
            ) from err
        raise RunLockError(f"cannot use {out_dir} as a run directory: {err.strerror or err}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "unknown pid"
            raise RunLockError(
                f"{out_dir} is in use by another titans train ({holder}): wait for it to finish, or choose "
                f"another train.out_dir"
            ) from None
        stale = _holder(fd)
        if stale:
            log(f"{out_dir}: the run before this one ({stale}) did not exit cleanly; taking over its directory")
        removed = _remove_partial_checkpoints(out_dir)
        if removed:
            log(f"{out_dir}: removed {len(removed)} unfinished checkpoint write(s): {', '.join(sorted(removed))}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
    finally:
        os.close(fd)  # releases the flock
