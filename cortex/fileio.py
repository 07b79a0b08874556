"""Files other processes read while Cortex writes them, locks between Cortex processes, and
bounded reads of files that may be hostile (`read_regular_file`).

A reader (another command, a restart after a crash) must see the old file or the new one,
never half of one: `atomic_write_bytes` writes a sibling temporary file and renames it over
the target. The temporary name carries the pid, so two processes writing the same file do
not write into each other's temporary file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import threading
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


def atomic_write_json(
    path: Path, data: Any, *, sort_keys: bool = False, newline: bool = False, mode: int | None = None
) -> None:
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


# --------------------------------------------------------------------------- bounded reads


READ_TIMEOUT_S = 30.0  # one file read; only a hung network file system gets near it


class UnreadableFile(Exception):
    """A file Cortex reads is missing, not a regular file, too large or unreadable. The message
    says which, without the path (the caller names the file and what it was for)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(
    path: str | os.PathLike[str], *, limit: int, whole: bool = True, timeout_s: float = READ_TIMEOUT_S
) -> bytes:
    """The bytes of a regular file, at most `limit` of them.

    Only regular files: a FIFO, a device (/dev/zero), a socket or a folder is refused before a
    byte is read, so nothing blocks or reads forever. With `whole`, a file larger than `limit`
    is refused; without it, its first `limit` bytes come back (a GGUF header). The read runs on a
    helper thread and is abandoned after `timeout_s` (a hung network mount)."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnreadableFile("no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnreadableFile("is a symlink loop") from None
        if e.errno == errno.ENXIO:
            raise UnreadableFile("is a socket, not a regular file") from None
        raise UnreadableFile(f"cannot be opened ({e.strerror})") from None
    abandoned = False
    try:
        st = os.fstat(fd)  # the opened file itself: no swap between a check and the open
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"is {_kind(st.st_mode)}, not a regular file")
        if whole and st.st_size > limit:
            raise UnreadableFile(f"is {st.st_size:,} bytes, more than the {limit:,} Cortex reads from such a file")
        result: list[bytes] = []
        failure: list[OSError] = []

        def read() -> None:
            chunks, left = [], limit + 1 if whole else limit
            try:
                while left > 0:
                    chunk = os.read(fd, min(left, 1 << 20))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    left -= len(chunk)
            except OSError as e:
                failure.append(e)
            result.append(b"".join(chunks))

        reader = threading.Thread(target=read, name=f"read {os.fspath(path)}", daemon=True)
        reader.start()
        reader.join(timeout_s)
        if reader.is_alive():
            abandoned = True  # the thread still owns the descriptor; closing it under a read is worse than leaking it
            raise UnreadableFile(f"could not be read within {timeout_s:g} s (a hung file system?)")
        if failure:
            raise UnreadableFile(f"cannot be read ({failure[0].strerror})")
        data = result[0]
        if whole and len(data) > limit:  # it grew after the size check
            raise UnreadableFile(f"is more than the {limit:,} bytes Cortex reads from such a file")
        return data
    finally:
        if not abandoned:
            os.close(fd)
