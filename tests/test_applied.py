"""The store of what was applied from each spec file (cortex/applied.py), on a real folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cortex.applied import (
    AppliedSpec,
    all_applied,
    applied_dir,
    forget_applied,
    read_applied,
    spec_sha256,
    write_applied,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _record(spec: Path, **changes: str) -> AppliedSpec:
    fields = dict(
        spec_path=str(spec.absolute()),
        spec_sha256=spec_sha256(spec),
        name="smollm2",
        runtime="process",
        source_revision="a" * 40,
        replica="smollm2-1",
        endpoint="http://127.0.0.1:8001",
        applied_at="2025-01-01T00:00:00+00:00",
    )
    return AppliedSpec(**{**fields, **changes})


def test_a_record_is_read_back_per_spec_file_until_forgotten(home: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("name: one\n")
    two.write_text("name: two\n")
    assert read_applied(one) is None and all_applied() == []

    first = _record(one)
    write_applied(first)
    write_applied(_record(two, name="two"))
    assert read_applied(one) == first
    assert read_applied(str(one)) == first  # a str or a Path names the same record
    assert sorted(r.name for r in all_applied()) == ["smollm2", "two"]
    [written] = [p for p in applied_dir().iterdir() if json.loads(p.read_text())["name"] == "smollm2"]
    assert applied_dir() == home / "applied-specs" and written.read_text().endswith("}\n")

    write_applied(_record(one, replica="smollm2-2"))  # a new apply replaces the record
    assert read_applied(one).replica == "smollm2-2" and len(all_applied()) == 2

    forget_applied(one)
    assert read_applied(one) is None and [r.name for r in all_applied()] == ["two"]
    forget_applied(one)  # forgetting twice is harmless


def test_a_record_of_a_deleted_spec_is_still_listed(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "gone.yaml"
    spec.write_text("name: gone\n")
    write_applied(_record(spec))
    spec.unlink()
    assert [r.spec_path for r in all_applied()] == [str(spec.absolute())]


def test_spec_changed_compares_the_file_with_what_was_applied(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\n")
    record = _record(spec)
    assert not record.spec_changed(spec)
    spec.write_text("name: s\nruntime: docker\n")
    assert record.spec_changed(spec)


# --- a spec applied to the fleet: its text travels to the hosts ----------------------------------


def test_a_fleet_host_keeps_the_spec_text_it_was_sent(home: Path, tmp_path: Path) -> None:
    from cortex.applied import fleet_specs_dir, store_fleet_spec, text_sha256
    from cortex.specfile import load_spec

    text = "name: smollm2\nsource:\n  gguf: /models/smollm2.gguf\nruntime: process\r\n"
    path = store_fleet_spec(text, "/control/specs/smollm2.yaml")
    assert path == fleet_specs_dir() / f"smollm2-{text_sha256(text)[:12]}.yaml"
    assert path.read_bytes() == text.encode()  # byte for byte: its digest is the control plane's
    assert spec_sha256(path) == text_sha256(text)
    assert load_spec(path).source.gguf == "/models/smollm2.gguf"
    assert store_fleet_spec(text, "/control/specs/smollm2.yaml") == path  # the same text, the same file


def test_a_fleet_spec_with_a_relative_path_is_refused_naming_file_and_line(home: Path, tmp_path: Path) -> None:
    from cortex.applied import fleet_specs_dir, store_fleet_spec
    from cortex.specfile import SpecError, fleet_spec_text

    spec = tmp_path / "specs" / "m.yaml"
    spec.parent.mkdir()
    spec.write_text("name: m\nruntime: process\nsource:\n  gguf: models/m.gguf\n")
    with pytest.raises(SpecError) as refused:
        fleet_spec_text(spec)
    assert str(refused.value).startswith(f"{spec}:4: source.gguf: 'models/m.gguf' is relative to the spec's folder")
    assert "write an absolute path" in str(refused.value)
    # ~ and ${VAR:-default} are the host's to expand; an absolute path is sent as written
    spec.write_text("name: m\nruntime: process\nsource:\n  gguf: ${MODELS:-/models}/m.gguf\n")
    assert fleet_spec_text(spec) == spec.read_text()
    # a host refuses one too (a control plane that did not check), and writes nothing
    with pytest.raises(SpecError, match=r"/control/m.yaml:3: source.path: 'm' is relative"):
        store_fleet_spec("name: m\nsource:\n  path: m\n", "/control/m.yaml")
    assert not fleet_specs_dir().exists()


def test_a_fleet_record_keeps_the_applied_text_and_reads_one_from_before(home: Path) -> None:
    import dataclasses

    from cortex.applied import FleetApplied, all_fleet_applied, applied_dir, read_fleet_applied, write_fleet_applied

    text = "name: m\nsource:\n  gguf: /models/m.gguf\nreplicas: 2\n"
    record = FleetApplied(
        "/control/m.yaml",
        "0123456789ab",
        "m",
        "cortex",
        2,
        {"h1": "0123456789ab", "h1_1": "0123456789ab"},
        "2026-12-02T00:00:00+00:00",
        text,
    )
    write_fleet_applied(record)
    assert read_fleet_applied("/control/m.yaml") == record  # what reconcile sends the hosts
    # a record written before the text was kept: it reads, with no text (reconcile reads the file)
    old = applied_dir() / "fleet" / "old.json"
    old.write_text(
        json.dumps(
            {k: v for k, v in dataclasses.asdict(record).items() if k != "spec_text"}
            | {"spec_path": "/control/old.yaml", "hosts": {"h2": "0123456789ab"}}
        )
    )
    assert {r.spec_path: r.spec_text for r in all_fleet_applied()} == {"/control/m.yaml": text, "/control/old.yaml": ""}


def test_a_failed_rollout_keeps_the_spec_that_last_applied_in_full() -> None:
    from cortex.applied import FleetApplied

    good = FleetApplied("/c/m.yaml", "aaaaaaaaaaaa", "m", "cortex", 2, {"h1": "aaaaaaaaaaaa"}, "t0", "good")
    failed = FleetApplied(
        "/c/m.yaml", "bbbbbbbbbbbb", "m", "cortex", 3, {"h1": "aaaaaaaaaaaa", "h2": "bbbbbbbbbbbb"}, "t1", "bad"
    )
    kept = failed.after_failure(good)
    assert (kept.spec_text, kept.spec_sha256, kept.replicas) == ("good", "aaaaaaaaaaaa", 2)
    assert kept.hosts == failed.hosts  # where replicas run now, whichever version
    assert failed.after_failure(None) == failed  # a failed first apply: nothing else to keep
