"""Watch a folder of spec files and report each spec that was created, changed or deleted.

    SpecWatcher(folder, on_change).run(stop)    # blocks; calls on_change(SpecChange) per spec

What counts is the state of the folder once a burst of file events has settled, not the
events themselves: an editor that saves through a temporary file and a rename, or five saves
in a row, yield one `changed` for the spec, and a save that leaves the bytes as they were
yields nothing. Each change carries the file's sha256 and, for a deleted spec, the model name
its last valid version declared (the file is gone, so nothing else can tell).

No Prefect here: `flows/serve.py` turns each change into a `cortex.spec.changed` or
`cortex.spec.deleted` event.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cortex.specfile import SPEC_SUFFIXES, SpecError, load_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecChange:
    kind: Literal["changed", "deleted"]
    path: Path  # absolute
    sha256: str | None  # None for a deleted spec
    name: str | None  # the model name of the last valid version seen, if any


def spec_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_spec_file(path: Path) -> bool:
    return path.suffix in SPEC_SUFFIXES and not path.name.startswith(".")


def scan(folder: Path) -> dict[Path, str]:
    """sha256 of every spec file directly in `folder` (hub/ and other sub-folders are not specs)."""
    out: dict[Path, str] = {}
    for path in sorted(folder.iterdir()):
        if is_spec_file(path) and path.is_file():
            try:
                out[path.resolve()] = spec_digest(path)
            except FileNotFoundError:  # deleted between listing and reading
                continue
    return out


def model_name(path: Path) -> str | None:
    """The spec's model name, or None while the file is invalid."""
    try:
        return load_spec(path).name
    except SpecError:
        return None


class SpecWatcher:
    """Calls `on_change` once per spec whose content differs after a burst settles.

    `quiet_ms`: a burst ends after this long without a file event; `max_wait_ms`: a burst that
    never pauses is cut here. `known`: the digests to start from (default: the folder as it is
    now, so only later edits count)."""

    def __init__(
        self,
        folder: str | Path,
        on_change: Callable[[SpecChange], None],
        *,
        quiet_ms: int = 700,
        max_wait_ms: int = 5000,
        known: dict[Path, str] | None = None,
    ):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is not a folder; name the folder that holds your spec files")
        self.on_change = on_change
        self.quiet_ms, self.max_wait_ms = quiet_ms, max_wait_ms
        self.known: dict[Path, str] = scan(self.folder) if known is None else dict(known)
        self.names: dict[Path, str] = {p: n for p in self.known if (n := model_name(p))}
        self.ready = threading.Event()  # set once the file-system watch is in place

    def settle(self) -> list[SpecChange]:
        """Compare the folder with what was last reported; remember and return the differences."""
        now = scan(self.folder)
        changes: list[SpecChange] = []
        for path, digest in now.items():
            if self.known.get(path) != digest:
                name = model_name(path)
                if name:
                    self.names[path] = name
                changes.append(SpecChange("changed", path, digest, name or self.names.get(path)))
        for path in self.known.keys() - now.keys():
            changes.append(SpecChange("deleted", path, None, self.names.pop(path, None)))
        self.known = now
        return changes

    def run(self, stop: threading.Event | None = None) -> None:
        """Watch until `stop` is set. A failing `on_change` is logged and the watch goes on: one
        event that could not be sent must not stop the watcher for every later edit."""
        import watchfiles

        stop = stop or threading.Event()

        def relevant(_change: watchfiles.Change, path: str) -> bool:
            p = Path(path)
            return p.parent == self.folder and is_spec_file(p)

        self.ready.set()
        for _batch in watchfiles.watch(
            self.folder,
            watch_filter=relevant,
            step=self.quiet_ms,
            debounce=self.max_wait_ms,
            stop_event=stop,
            recursive=False,
            yield_on_timeout=False,
        ):
            for change in self.settle():
                try:
                    self.on_change(change)
                except Exception:  # noqa: BLE001 - logged with its traceback; the next edit must still count
                    log.exception("could not report %s of %s", change.kind, change.path)

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a daemon thread; returns once the watch is in place."""
        thread = threading.Thread(target=self.run, args=(stop,), name=f"spec-watcher:{self.folder}", daemon=True)
        thread.start()
        self.ready.wait(10)
        return thread
