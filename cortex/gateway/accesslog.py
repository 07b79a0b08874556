"""The structured access log: one JSON line per proxied request, never prompt contents.

Lines are buffered in memory and written by the gateway's maintenance loop (at most about half
a second late, or at once past 1,000 lines), so a request costs no write system call and no
pass through the logging module.
"""

from __future__ import annotations

from typing import BinaryIO

import orjson

FLUSH_LINES = 1000


class AccessLog:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.lines: list[bytes] = []

    def write(self, record: dict) -> None:
        self.lines.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        if len(self.lines) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            data = b"".join(self.lines)
            self.lines.clear()
            self.stream.write(data)
            self.stream.flush()
