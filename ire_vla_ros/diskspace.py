"""Free-space checks before and during writes (episodes, checkpoints).

A full disk must end a write with a clear error before the filesystem returns ENOSPC: h5py cannot
recover from ENOSPC in the middle of a file (measured: the failed close leaves an HDF5 handle that
segfaults the process when it is freed), and a half-written checkpoint wastes the space the next
one needs.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

MB = 1024 * 1024


class DiskSpaceError(OSError):
    """Not enough free space for a write (raised before writing; nothing was damaged)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _existing(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the filesystem holding `path` (or its nearest existing parent)."""
    st = os.statvfs(_existing(Path(path)))
    return int(st.f_bavail) * int(st.f_frsize)


def free_mb(path: str | os.PathLike) -> float:
    """Free MB on `path`'s filesystem (for status reports); -1 when it cannot be read."""
    try:
        return round(free_bytes(path) / MB, 1)
    except OSError:
        return -1.0


def require_free_space(path: str | os.PathLike, min_free_mb: float, need_bytes: int = 0, what: str = "write") -> int:
    """DiskSpaceError unless `need_bytes` fit on `path`'s filesystem with `min_free_mb` left over.

    Returns the free bytes seen. `min_free_mb <= 0` and `need_bytes == 0` turn the check off.
    """
    if min_free_mb <= 0 and need_bytes <= 0:
        return -1
    free = free_bytes(path)
    required = int(max(0.0, min_free_mb) * MB) + int(need_bytes)
    if free < required:
        raise DiskSpaceError(
            f"disk full: {free / MB:.1f} MB free under {path}, {what} needs {need_bytes / MB:.1f} MB "
            f"+ min_free_mb {min_free_mb:g} MB")
    return free


def is_disk_error(exc: BaseException) -> bool:
    """An OSError that means the storage failed (full, I/O error, read-only, quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT)
