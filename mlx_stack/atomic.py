"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from mlx_stack.private import FILE_MODE, make_dirs


def write_atomic(path: Path, data: str | bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The mode (private unless asked otherwise) is set on the temporary file before any byte is
    written, so a secret is never readable by others, even for an instant. Missing folders
    are made private too.
    """
    make_dirs(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
