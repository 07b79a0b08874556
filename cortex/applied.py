"""What was applied from each spec file, kept on disk between runs.

`cortex serve` applies spec files (flows/reconcile.py). A scheduled run must know whether the
source's commit moved since the last apply, reconcile whether a file changed since then, and a
deleted spec's retirement which model it had deployed: none of that can live in memory. So
every apply writes one `AppliedSpec` record per spec file to `<CORTEX_HOME>/applied-specs/`,
named by a hash of the spec's absolute path, written atomically (a reader sees the old record
or the new one). A spec applied to the fleet (flows/fleet.py) gets a `FleetApplied` record in
`applied-specs/fleet/` instead: how many replicas it wants and which hosts run them, which the
fleet-reconcile flow keeps true when a host is lost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cortex.fileio import atomic_write_bytes, atomic_write_json
from cortex.hub import sha256_of
from cortex.settings import Settings


# AppliedSpec.runtime of a spec applied to the fleet's hosts (flows/fleet.py): its replicas run
# there, so this machine's runtimes and restart watch leave it to the hosts and to reconcile.
FLEET = "fleet"


@dataclass
class AppliedSpec:
    spec_path: str  # absolute
    spec_sha256: str
    name: str  # the served model name
    runtime: str  # process | docker | FLEET
    source_revision: str  # commit sha, or sha256 of local weights ("" on the fleet: each host resolves it)
    replica: str  # on the fleet: the hosts it was deployed on, comma-separated
    endpoint: str
    applied_at: str

    @property
    def on_fleet(self) -> bool:
        return self.runtime == FLEET

    def spec_changed(self, spec_path: str | Path) -> bool:
        """Whether the file at `spec_path` differs from the one this record was applied from."""
        return self.spec_sha256 != spec_sha256(spec_path)


def spec_sha256(spec_path: str | Path) -> str:
    """The digest an `AppliedSpec` records of its spec file."""
    return sha256_of(Path(spec_path))


def text_sha256(text: str) -> str:
    """The sha256 of a spec's text: spec_sha256 of a file holding it (UTF-8, as read)."""
    return hashlib.sha256(text.encode()).hexdigest()


def fleet_specs_dir() -> Path:
    """Where a fleet host keeps the spec texts its deploys were sent."""
    return Path(Settings.load().home) / "fleet-specs"


def store_fleet_spec(text: str, origin: str) -> Path:
    """A spec text fleet-apply sent this host, checked (SpecError names `origin`, the control
    plane's file, with its lines) and written atomically to `<CORTEX_HOME>/fleet-specs/
    <name>-<sha12>.yaml` (the same text is the same file), for the deploy to read like any spec."""
    from cortex.specfile import SpecError, parse_spec_text, relative_path_problems

    problems = relative_path_problems(text, origin)
    if problems:
        raise SpecError(problems)
    spec = parse_spec_text(text, origin, base=fleet_specs_dir())
    path = fleet_specs_dir() / f"{spec.name}-{text_sha256(text)[:12]}.yaml"
    if not path.is_file() or path.read_bytes() != text.encode():
        atomic_write_bytes(path, text.encode())
    return path


def applied_dir() -> Path:
    return Path(Settings.load().home) / "applied-specs"


def _record_path(spec_path: str | Path) -> Path:
    key = hashlib.sha256(str(Path(spec_path).absolute()).encode()).hexdigest()[:24]
    return applied_dir() / f"{key}.json"


def _load(record: Path) -> AppliedSpec:
    return AppliedSpec(**json.loads(record.read_text()))


def read_applied(spec_path: str | Path) -> AppliedSpec | None:
    """The record of the last apply of the spec file at `spec_path`; None if it was never applied."""
    path = _record_path(spec_path)
    return _load(path) if path.is_file() else None


def write_applied(record: AppliedSpec) -> None:
    atomic_write_json(_record_path(record.spec_path), asdict(record), newline=True)


def forget_applied(spec_path: str | Path) -> None:
    _record_path(spec_path).unlink(missing_ok=True)


def all_applied() -> list[AppliedSpec]:
    """Every record, including those of spec files deleted since."""
    folder = applied_dir()
    return [_load(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


@dataclass
class FleetApplied:
    """A spec applied to the fleet (flow fleet-apply): what fleet-reconcile keeps running.
    It keeps the spec's text, so a reconcile sends the hosts what was applied, not what the file
    says now."""

    spec_path: str  # absolute
    spec_sha256: str
    name: str  # the served model name
    pool: str
    replicas: int  # wanted
    # slot -> the spec sha256 (12 hex) its replica was last deployed from; a slot is a host's
    # name for its instance 0, `<host>_<i>` for instance i (cortex.fleet.hosts.Slot)
    hosts: dict[str, str]
    applied_at: str
    # the spec's text as applied: what reconcile sends the hosts (no host has the file); ""
    # in a record from before it was kept, when reconcile reads the file at spec_path
    spec_text: str = ""

    def after_failure(self, previous: FleetApplied | None) -> FleetApplied:
        """This record of a rollout that stopped at a failure: the hosts as they are now, but the
        spec (text, digest, replicas) that last applied in full, so that a lost replica is placed
        again from what the hosts not swapped run, not from the spec that just failed. A first
        apply that failed has no previous record: its own spec is all there is."""
        if previous is None or not previous.spec_text:
            return self
        return replace(
            self,
            spec_sha256=previous.spec_sha256,
            replicas=previous.replicas,
            spec_text=previous.spec_text,
            applied_at=previous.applied_at,
        )


def _fleet_record_path(spec_path: str | Path) -> Path:
    return applied_dir() / "fleet" / _record_path(spec_path).name


def read_fleet_applied(spec_path: str | Path) -> FleetApplied | None:
    path = _fleet_record_path(spec_path)
    return FleetApplied(**json.loads(path.read_text())) if path.is_file() else None


def write_fleet_applied(record: FleetApplied) -> None:
    atomic_write_json(_fleet_record_path(record.spec_path), asdict(record), newline=True)


def forget_fleet_applied(spec_path: str | Path) -> None:
    _fleet_record_path(spec_path).unlink(missing_ok=True)


def all_fleet_applied() -> list[FleetApplied]:
    """Every spec applied to the fleet, by the hash of its path."""
    folder = applied_dir() / "fleet"
    return [FleetApplied(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
