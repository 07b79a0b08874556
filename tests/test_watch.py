"""The spec-folder watcher on a real folder (watchfiles' inotify watch): bursts settle into one
change per spec, unchanged bytes are no change, renames count as saves, a deleted spec
carries the model name its last valid version declared."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from cortex.watch import SpecChange, SpecWatcher

SPEC = "name: {name}\nsource:\n  gguf: ./model.gguf\nresources: {{concurrency: {n}}}\n"


QUIET_MS = 2000  # the burst below is five saves in a fraction of a second; a busy machine must not split it


class Watched:
    """The watched folder and what the watcher reported, with a probe spec to synchronise on."""

    def __init__(self, specs: Path) -> None:
        self.specs = specs
        self.probe = (specs / "probe.yaml").resolve()
        self.reported: list[SpecChange] = []
        self.saves = 0

    def changes(self) -> list[SpecChange]:
        return [c for c in self.reported if c.path != self.probe]

    def sync(self, resave_every: float | None = None, timeout: float = 60) -> list[SpecChange]:
        """Save the probe and wait until the watcher reports it; return the other changes. Each
        report compares the whole folder and reports come in order, so by then every save made
        before the probe has been reported: nothing has to guess how long the watcher takes.
        `resave_every`: save again until it is seen (while the watch may not be in place yet)."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        save_at = 0.0
        while not any(c.path == self.probe and c.sha256 in seen for c in list(self.reported)):
            now = time.monotonic()
            assert now < deadline, f"the watcher did not report the probe within {timeout} s"
            if save_at is not None and now >= save_at:
                self.saves += 1
                self.probe.write_text(SPEC.format(name="probe", n=self.saves))
                seen.add(hashlib.sha256(self.probe.read_bytes()).hexdigest())
                save_at = now + resave_every if resave_every else None
            time.sleep(0.05)
        return self.changes()


@pytest.fixture
def watched(tmp_path: Path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "hub").mkdir()  # a sub-folder of the specs folder is not watched
    (specs / "old.yaml").write_text(SPEC.format(name="old-model", n=1))
    w = Watched(specs)
    stop = threading.Event()
    watcher = SpecWatcher(specs, w.reported.append, quiet_ms=QUIET_MS, max_wait_ms=10 * QUIET_MS)
    thread = watcher.start(stop)
    w.sync(resave_every=0.5)  # the watch is in place once it reports the probe
    assert w.changes() == []
    yield w
    stop.set()
    thread.join(10)


def test_a_burst_of_saves_is_one_change_with_the_final_digest(watched) -> None:
    specs = watched.specs
    path = specs / "a.yaml"
    for n in range(1, 6):
        tmp = specs / ".a.yaml.swp"
        tmp.write_text(SPEC.format(name="a-model", n=n))
        tmp.replace(path)  # how editors save
        time.sleep(0.05)
    (specs / "notes.txt").write_text("not a spec")
    (specs / "hub" / "x.yaml").write_text("not watched")
    [change] = watched.sync()
    assert change == SpecChange("changed", path.resolve(), hashlib.sha256(path.read_bytes()).hexdigest(), "a-model")


def test_same_bytes_are_no_change_and_delete_names_the_model(watched) -> None:
    old = watched.specs / "old.yaml"
    old.write_text(old.read_text())  # saved without an edit
    assert watched.sync() == []
    old.write_text("name: old-model\nsource: {gguf: [\n")  # invalid now
    [changed] = watched.sync()
    assert changed.kind == "changed" and changed.name == "old-model"  # the last valid name
    old.unlink()
    [_, deleted] = watched.sync()
    assert deleted == SpecChange("deleted", old.resolve(), None, "old-model")


def test_a_missing_folder_is_an_error_that_says_so(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="not a folder"):
        SpecWatcher(tmp_path / "nope", print)
