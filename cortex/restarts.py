"""Replace a replica whose engine died: which applied specs have no running model, and when
to try again after a restart that did not bring it back.

    dead_specs(folder)        {spec path: why} for each spec of `folder` that Cortex applied
                              (cortex.applied), whose file is still there, and whose model has no
                              running replica in the runtime it was applied to
    RestartBackoff.due(...)   which of those to redeploy now: at once the first time, then after
                              base, 2 x base, 4 x base ... (at most max_s) counted from the end of
                              the previous attempt, per spec; a spec that runs again starts over

No Prefect here: `cortex serve` (flows/serve.py) polls these and starts an apply-spec run per
restart, which says why in its log and artifact. The attempt counts live in the serve process:
they pace retries, they are not a record of what runs (the runtimes and cortex.applied are).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cortex.applied import all_applied
from cortex.runtime import ReplicaError, get_runtime
from cortex.runtime.base import failure_hint


def dead_specs(folder: str | Path) -> dict[str, str]:
    """{spec path: why its model is down} (see the module docstring)."""
    folder = Path(folder).absolute()
    down: dict[str, str] = {}
    for record in all_applied():
        path = Path(record.spec_path)
        if path.parent != folder or not path.is_file():
            continue  # another folder's, or deleted (retire-spec handles that)
        if record.on_fleet:
            continue  # its replicas run on the fleet's hosts, not here
        try:
            runtime = get_runtime(record.runtime)
            replicas = runtime.replicas_of(record.name)
        except ReplicaError:
            continue  # the runtime cannot be reached (no Docker daemon): nothing to decide from
        if any(runtime.is_running(r) for r in replicas):
            continue
        last = next((r for r in replicas if r.name == record.replica), None)
        if last is None:
            why = (
                f"its replica {record.replica} is gone: its engine died and the replica was cleaned "
                "up, or it was stopped outside Cortex"
            )
        else:
            try:
                code = runtime.exit_code(last)
            except ReplicaError:
                code = None
            logs = runtime.logs(last, lines=10)
            hint = failure_hint(logs, code)
            why = f"the engine of {last.name} exited (code {code})" + (f": {hint}" if hint else "")
        down[str(path)] = f"{record.name} is not running: {why}"
    return down


@dataclass(frozen=True)
class Restart:
    spec_path: str
    attempt: int  # 1 for the first restart since the model last ran
    reason: str

    def describe(self) -> str:
        return f"restart {self.attempt}: {self.reason}"


@dataclass
class RestartBackoff:
    base_s: float = 30.0
    max_s: float = 600.0
    clock: Callable[[], float] = time.monotonic
    attempts: dict[str, int] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)

    def delay_s(self, attempt: int) -> float:
        """The wait after attempt `attempt` failed."""
        return min(self.max_s, self.base_s * 2 ** (attempt - 1))

    def due(self, down: dict[str, str], busy: set[str]) -> list[Restart]:
        """The restarts to start now. `down`: dead_specs(); `busy`: specs whose last restart
        run has not finished (the wait counts from its end)."""
        now = self.clock()
        for path in list(self.attempts):
            if path not in down and path not in busy:  # it runs again (or is no longer ours)
                del self.attempts[path]
                self.not_before.pop(path, None)
        restarts = []
        for path, reason in sorted(down.items()):
            attempt = self.attempts.get(path, 0)
            if path in busy:
                self.not_before[path] = now + self.delay_s(max(attempt, 1))
                continue
            if now < self.not_before.get(path, 0.0):
                continue
            self.attempts[path] = attempt + 1
            self.not_before[path] = now + self.delay_s(attempt + 1)
            restarts.append(Restart(path, attempt + 1, reason))
        return restarts
