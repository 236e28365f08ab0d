"""Files replaced whole: a crash (or a full disk) while writing leaves the old file or the
complete new one, never a part. Checkpoints, their index, run metadata and record files
are all written this way."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the block to write; when the block ends
    without error the file is fsynced and renamed over `path` (and the directory fsynced),
    otherwise removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
