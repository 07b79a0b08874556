"""How a spec's replicas change across the fleet: a rolling update, and a reconcile after a loss.

    rollout_steps(placement, holding)      the steps of applying a spec to the fleet, in order
    reconcile_steps(want, assigned, ...)   what a reconcile does: keep, re-place, retire

A rolling update never takes more than one replica out at a time. The hosts that already run a
replica of the model (`holding`) keep it, and each is replaced in turn by that host's own
deploy, which is make-before-break: the new replica is started beside the old one and must be
healthy, smoke-tested, benchmark-gated and registered in the gateway before the old one is
drained and stopped (flows/deploy.py roll_out). So serving capacity stays at N during each swap.
A host the planner says has no room for a second replica beside the old one (`HostTrace.fits`
is false: its free memory, which the old replica already uses, is too small) is swapped with the
old replica stopped first: capacity N-1 for that swap, and the step says so. Moving the new
replica to another host first would keep N there, but it changes which hosts serve the model
on every edit; an operator who wants N on full hosts adds a host and a replica instead.
Hosts that must gain a replica are deployed first (capacity only grows), hosts that hold one
the placement no longer allows are retired last.

Pure: the flows (flows/fleet.py) run the steps and stop at the first failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cortex.fleet.placement import Placement

Action = Literal["add", "swap", "stop-then-deploy", "retire"]


@dataclass(frozen=True)
class FleetStep:
    host: str
    action: Action
    why: str

    def to_json(self) -> dict[str, str]:
        return {"host": self.host, "action": self.action, "why": self.why}


def rollout_steps(placement: Placement, holding: Sequence[str]) -> list[FleetStep]:
    """The steps that make `placement.replicas` replicas of the model run, starting from the
    online hosts in `holding` (those that run one now). A host in `holding` keeps its replica
    (replaced in place) while the placement's filters still allow it (allow-list, labels,
    runtime); the placement's own choices fill what is missing. No step when nothing runs and
    nothing can be placed: the caller reports `placement.shortfall`."""
    traces = {t.host: t for t in placement.hosts}
    allowed = [
        h
        for h in sorted(holding)
        if h in traces and traces[h].allowed and traces[h].runtime_ok and not traces[h].missing_labels
    ]
    kept = allowed[: placement.replicas]
    added = [h for h in dict.fromkeys(r.host for r in placement.placed) if h not in kept]
    added = added[: max(0, placement.replicas - len(kept))]
    steps = [FleetStep(h, "add", "placed: " + traces[h].reason) for h in added]
    for h in kept:
        if traces[h].fits:
            steps.append(FleetStep(h, "swap", "replaced in place: the new replica starts beside the old one"))
        else:
            steps.append(
                FleetStep(
                    h,
                    "stop-then-deploy",
                    "no room for a second replica beside the old one: the old one stops first "
                    f"(capacity N-1 during this swap; {traces[h].reason})",
                )
            )
    for h in sorted(holding):
        if h not in kept:
            why = (
                "more replicas than the spec wants"
                if h in allowed
                else "the placement no longer allows it: " + traces[h].reason
                if h in traces
                else "the host is not in the placement"
            )
            steps.append(FleetStep(h, "retire", why))
    return steps


@dataclass(frozen=True)
class ReconcilePlan:
    alive: list[str]  # assigned hosts whose replica serves
    missing: int  # replicas to place again
    candidates: list[str]  # online hosts that may take one: every online host without a live replica
    stale: list[str]  # online hosts holding a replica nobody assigned them


def reconcile_steps(
    wanted: int,
    assigned: Sequence[str],
    online: Sequence[str],
    holding: Mapping[str, bool],
) -> ReconcilePlan:
    """What fleet-reconcile does for one spec. `assigned`: the hosts the last apply or reconcile
    gave a replica; `online`: hosts whose Prefect worker is online; `holding`: host -> whether
    its record lists a replica of the model that serves (True) or one that does not answer
    (False: its engine died, or the gateway marks it unhealthy). A replica is alive when its
    host is assigned, online and holding a serving one. Missing replicas may go to any other
    online host; the placement prefers those that hold none of the model (spread). An online
    host holding a replica that is not alive is stale (the host was lost, its replicas were
    re-placed, and it came back; or its engine stopped answering): unless the placement picks
    it again (its deploy then replaces the dead replica), the flow retires it."""
    alive = [h for h in assigned if h in online and holding.get(h) is True]
    missing = max(0, wanted - len(alive))
    candidates = [h for h in sorted(online) if h not in alive]
    stale = [h for h in sorted(online) if h in holding and h not in alive]
    return ReconcilePlan(alive, missing, candidates, stale)
