"""Reading server-sent events (SSE) as OpenAI-compatible servers and llama-server send them.

These servers send one JSON message per `data:` line and end with `data: [DONE]`; between
messages they may send comment lines (`: ping`) and blank separators, which carry no data.
No server here splits one message over several `data:` lines, so a line is a message.

`sse_data` reads one line and is all the benchmark client uses: it takes each token event's
arrival time itself, right after the line arrives, with nothing in between. `iter_sse_data`
is the loop the smoke tests and the quality check use. Both hand `[DONE]` to the caller,
which decides whether it ends the stream or whether the rest is drained (the benchmark
drains it so the connection can be kept alive and reused).
"""

from __future__ import annotations

from typing import Iterable, Iterator

DONE = "[DONE]"


def sse_data(line: str) -> str | None:
    """The payload of one SSE line, or None for a line without data (comment, blank, event name)."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The payloads of a stream's `data:` lines in order, `[DONE]` included."""
    for line in lines:
        data = sse_data(line)
        if data is not None:
            yield data
