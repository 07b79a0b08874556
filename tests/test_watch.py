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


@pytest.fixture
def watched(tmp_path: Path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "hub").mkdir()  # a sub-folder of the specs folder is not watched
    (specs / "old.yaml").write_text(SPEC.format(name="old-model", n=1))
    changes: list[SpecChange] = []
    stop = threading.Event()
    watcher = SpecWatcher(specs, changes.append, quiet_ms=300, max_wait_ms=3000)
    thread = watcher.start(stop)
    time.sleep(0.5)
    yield specs, changes
    stop.set()
    thread.join(10)


def settled(changes: list[SpecChange], count: int, timeout: float = 10) -> list[SpecChange]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(changes) < count:
        time.sleep(0.1)
    time.sleep(1.0)  # anything more would have arrived by now
    return list(changes)


def test_a_burst_of_saves_is_one_change_with_the_final_digest(watched) -> None:
    specs, changes = watched
    path = specs / "a.yaml"
    for n in range(1, 6):
        tmp = specs / ".a.yaml.swp"
        tmp.write_text(SPEC.format(name="a-model", n=n))
        tmp.replace(path)  # how editors save
        time.sleep(0.05)
    (specs / "notes.txt").write_text("not a spec")
    (specs / "hub" / "x.yaml").write_text("not watched")
    [change] = settled(changes, 1)
    assert change == SpecChange("changed", path.resolve(), hashlib.sha256(path.read_bytes()).hexdigest(), "a-model")


def test_same_bytes_are_no_change_and_delete_names_the_model(watched) -> None:
    specs, changes = watched
    old = specs / "old.yaml"
    old.write_text(old.read_text())  # saved without an edit
    assert settled(changes, 1, timeout=2) == []
    old.write_text("name: old-model\nsource: {gguf: [\n")  # invalid now
    [changed] = settled(changes, 1)
    assert changed.kind == "changed" and changed.name == "old-model"  # the last valid name
    old.unlink()
    [_, deleted] = settled(changes, 2)
    assert deleted == SpecChange("deleted", old.resolve(), None, "old-model")


def test_a_missing_folder_is_an_error_that_says_so(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="not a folder"):
        SpecWatcher(tmp_path / "nope", print)
