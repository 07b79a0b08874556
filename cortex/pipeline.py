"""From a spec file to a plan and a launch spec: the pure part of the pipeline, in one call.

Reads the spec, inspects the model (no weights downloaded), takes the hardware (detected or
declared), decides the engine, plans memory and builds the launch spec. Flows call this
first; `cortex plan` prints it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortex import hardware
from cortex.facts import ModelFacts, facts_for_source
from cortex.fleet.inventory import HostInventory
from cortex.fleet.placement import Placement, place
from cortex.hardware import Inventory
from cortex.launch import LaunchSpec, build_launch
from cortex.plan import Plan, make_plan
from cortex.spec import ModelSpec
from cortex.specfile import load_spec, parse_spec_text


@dataclass
class PlannedModel:
    spec_path: Path
    spec: ModelSpec
    facts: ModelFacts
    inventory: Inventory
    plan: Plan
    launch: LaunchSpec

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {
            "spec": str(self.spec_path),
            "name": self.spec.name,
            "engine": p.engine,
            "engine_version": p.engine_version,
            "trace": [
                {
                    "rule": r.rule,
                    "question": r.question,
                    "matched": r.matched,
                    "decided": r.decided,
                    "engine": r.engine,
                    "reason": r.reason,
                    **({"policy": r.policy} if r.policy else {}),
                }
                for r in p.decision.trace
            ],
            "pinned": p.decision.pinned,
            "why_not": p.decision.why_not,
            "facts": self.facts.summary(),
            "hardware": {
                "source": self.inventory.source,
                "gpus": [
                    {"index": g.index, "memory_bytes": g.memory_bytes, "name": g.name} for g in self.inventory.gpus
                ],
                "cpu_cores": self.inventory.cpu_cores,
                "ram_bytes": self.inventory.ram_bytes,
            },
            "plan": p.to_json(),
            "artifact": {
                "format": p.artifact.format,
                "quantization": p.artifact.quantization,
                "predicted_bytes": p.artifact.predicted_bytes,
                "convert_from": p.artifact.convert_from,
            },
            "launch": self.launch.to_json(),
        }


def plan_spec(
    spec: ModelSpec,
    spec_path: Path,
    *,
    gpus: int | None = None,
    gpu_memory: int | None = None,
    detected: Inventory | None = None,
    artifact: Path | list[Path] | None = None,
) -> PlannedModel:
    facts = facts_for_source(spec.source, spec_dir=spec_path.resolve().parent)
    inv = hardware.resolve(
        detected or hardware.detect(),
        gpus if gpus is not None else spec.resources.gpus,
        gpu_memory if gpu_memory is not None else spec.resources.gpu_memory,
    )
    plan = make_plan(spec, facts, inv)
    launch = build_launch(spec, plan, artifact)
    return PlannedModel(spec_path, spec, facts, inv, plan, launch)


def plan_spec_file(path: str | Path, **kwargs: Any) -> PlannedModel:
    path = Path(path)
    return plan_spec(load_spec(path), path, **kwargs)


def place_spec_text(text: str, path: str | Path, hosts: Sequence[HostInventory]) -> tuple[ModelSpec, Placement]:
    """The spec `text`, read from the file at `path` (its messages name it), placed over `hosts`:
    what fleet-apply sends to the hosts is exactly what it placed."""
    path = Path(path)
    spec = parse_spec_text(text, str(path), base=Path(os.path.realpath(path)).parent)
    facts = facts_for_source(spec.source, spec_dir=path.resolve().parent)
    return spec, place(spec, facts, hosts)


def place_spec_file(path: str | Path, hosts: Sequence[HostInventory]) -> tuple[ModelSpec, Placement]:
    """The spec at `path` placed over `hosts` (cortex.fleet.placement), its model inspected once."""
    path = Path(path)
    spec = load_spec(path)
    facts = facts_for_source(spec.source, spec_dir=path.resolve().parent)
    return spec, place(spec, facts, hosts)
