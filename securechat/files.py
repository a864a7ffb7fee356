"""Durable, atomic writes of files that may hold secrets.

A file is written under a temporary name beside its target, created with its final mode (so a
private key is never readable by others, even for a moment), fsynced, and renamed into place;
then the folder is fsynced so the rename survives a crash. Errors are OSError: callers turn them
into their own messages.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_temp(folder: Path, name: str, data: bytes, mode: int) -> Path:
    """Write `data` to a fresh temporary sibling of folder/name with `mode`; return its path."""
    temp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temp, flags, mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # the umask may have removed bits we want (ca.pem must be 0644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink()
        raise
    os.close(fd)
    return temp


def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable; not every platform can open a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new one."""
    temp = write_temp(path.parent, path.name, data, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
