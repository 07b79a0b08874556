"""Files other processes read while Cortex writes them, and locks between Cortex processes.

A reader (another command, a restart after a crash) must see the old file or the new one,
never half of one: `atomic_write_bytes` writes a sibling temporary file and renames it over
the target. The temporary name carries the pid, so two processes writing the same file do
not write into each other's temporary file.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` in one rename (its folder is created); `mode` is set before
    the rename, so the file never appears with looser permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any, *, sort_keys: bool = False, newline: bool = False,
                      mode: int | None = None) -> None:
    """`data` as JSON indented by 2; `sort_keys` and a trailing `newline` as each file has
    always been written, so existing files keep their exact format."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys) + ("\n" if newline else "")
    atomic_write_bytes(path, text.encode(), mode=mode)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its folder), waiting while another
    process holds it. The kernel releases it if the holder dies, so no stale lock remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
