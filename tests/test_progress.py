"""Progress of long work: plain lines off a terminal (CI, logs), bounded in number."""

from __future__ import annotations

import io

import pytest

from cortex.progress import progress


def test_plain_lines_say_start_each_tenth_and_end() -> None:
    out = io.StringIO()
    with progress("building llama.cpp", unit="steps", stream=out, every_s=3600) as bar:
        for n in range(1, 211):
            bar.update(n, total=210)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("cortex: building llama.cpp:") and lines[0].split("(")[0].endswith(" started ")
    assert len(lines) == 1 + 10 + 1, lines  # started, each tenth, done: not one line per step
    assert "210/210 steps" in lines[-1] and " done (" in lines[-1]


def test_a_failure_is_said_and_raised() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress("download", total=100, unit="MB", stream=out) as bar:
        bar.update(5)
        raise RuntimeError("disk full")
    assert "failed" in out.getvalue().splitlines()[-1]
