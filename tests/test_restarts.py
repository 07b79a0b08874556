"""The pacing of restarts of a dead replica (cortex.restarts.RestartBackoff), on a clock the test
moves: the first restart at once, then waits that double from the end of each failed attempt,
capped, and a model that runs again starts over. The restart itself, on the real parts, is in
tests/test_serve.py."""

from __future__ import annotations

from cortex.restarts import RestartBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restarts_back_off_exponentially_per_spec_and_start_over_once_it_runs() -> None:
    clock = Clock()
    backoff = RestartBackoff(base_s=10, max_s=35, clock=clock)
    down = {"/specs/a.yaml": "a is not running", "/specs/b.yaml": "b is not running"}

    first = backoff.due(down, busy=set())
    assert [(r.spec_path, r.attempt) for r in first] == [("/specs/a.yaml", 1), ("/specs/b.yaml", 1)]
    assert first[0].describe() == "restart 1: a is not running"

    # While a's run is going, nothing; the wait counts from the moment it is seen finished.
    clock.now += 100
    assert backoff.due(down, busy={"/specs/a.yaml", "/specs/b.yaml"}) == []
    clock.now += 9
    assert backoff.due(down, busy=set()) == []
    clock.now += 1
    assert [(r.spec_path, r.attempt) for r in backoff.due(down, busy=set())] == [
        ("/specs/a.yaml", 2),
        ("/specs/b.yaml", 2),
    ]

    # b runs again: it starts over; a keeps failing: 20 s, then the cap of 35 s.
    clock.now += 19
    assert backoff.due({"/specs/a.yaml": "a"}, busy=set()) == []
    clock.now += 1
    assert [r.attempt for r in backoff.due({"/specs/a.yaml": "a"}, busy=set())] == [3]
    assert [backoff.delay_s(n) for n in (1, 2, 3, 4)] == [10, 20, 35, 35]
    clock.now += 34
    assert backoff.due({"/specs/a.yaml": "a"}, busy=set()) == []
    clock.now += 1
    assert [r.attempt for r in backoff.due({"/specs/a.yaml": "a", "/specs/b.yaml": "b"}, busy=set())] == [4, 1]
