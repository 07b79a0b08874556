"""How long placement takes (issue 12): specs placed one after another on a fleet of declared
hosts, each placement starting from the load the previous ones left (`Placement.load_after`),
as the control plane would place a folder of specs. Target: 500 specs over 100 hosts under 1 s.

    .venv/bin/python benchmarks/placement_bench.py [--json results.json]

The specs are the example specs in specs/ (their models read offline from specs/hub), varied
in name, replicas (1-3), context length, concurrency and a label selector on some; the hosts
are four kinds (8 x H100 80 GB, 4 x L40S 48 GB, 2 x A100 40 GB, a CPU box), each with its own
name, address and labels. Reading the models (once per source) is timed apart: a plan needs it
with or without a fleet. Plans are cached per (spec's planning fields, host hardware shape) in
one PlanCache shared by the whole run; the table says how many plans were made. wall_s is the
clock, cpu_s this process's CPU time (the same on an idle machine; less when others share it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the example specs' models come from specs/hub

from cortex.facts import ModelFacts, facts_for_source  # noqa: E402
from cortex.fleet.inventory import HostInventory  # noqa: E402
from cortex.fleet.placement import HostLoad, PlanCache, place  # noqa: E402
from cortex.spec import ModelSpec  # noqa: E402
from cortex.specfile import load_spec  # noqa: E402

KINDS = [  # (label, GPUs, total MiB, free MiB, RAM GiB)
    ("h100", 8, 81559, 81000, 2048),
    ("l40s", 4, 46068, 45000, 512),
    ("a100", 2, 40960, 40000, 256),
    ("cpu", 0, 0, 0, 256),
]


def fleet(n: int) -> list[HostInventory]:
    hosts = []
    for i in range(n):
        kind, count, total, free, ram = KINDS[i % len(KINDS)]
        hosts.append(
            HostInventory(
                name=f"{kind}-{i:04d}",
                address=f"10.{i // 250}.{i % 250}.1",
                labels={"gpu": kind, "zone": f"z{i % 3}"},
                gpus=[{"name": kind.upper(), "memory_total_mib": total, "memory_free_mib": free}] * count,
                cpu_cores=64,
                ram_bytes=ram * 2**30,
                runtimes=["docker", "process"],
            )
        )
    return hosts


def specs(n: int) -> tuple[list[ModelSpec], dict[str, ModelFacts], float]:
    """n specs varied from the examples, and their models' facts (read once per source)."""
    examples = sorted((ROOT / "specs").glob("*.yaml"))
    t0 = time.perf_counter()
    loaded = []
    facts: dict[str, ModelFacts] = {}
    for path in examples:
        spec = load_spec(path)
        loaded.append(spec)
        facts[spec.name] = facts_for_source(spec.source, spec_dir=path.resolve().parent)
    read_s = time.perf_counter() - t0
    out = []
    for i in range(n):
        base = loaded[i % len(loaded)]
        resources = base.resources.model_copy(
            update={"context_length": (4096, 8192)[i % 2], "concurrency": (2, 4, 8)[i % 3], "gpu_memory": None}
        )
        placement = base.placement.model_copy(update={"labels": {"zone": f"z{i % 3}"} if i % 5 == 0 else {}})
        out.append(
            base.model_copy(
                update={
                    "name": f"{base.name[:50]}-{i:04d}",
                    "replicas": 1 + i % 3,
                    "resources": resources,
                    "placement": placement,
                }
            )
        )
    facts_by_name = {s.name: facts[loaded[i % len(loaded)].name] for i, s in enumerate(out)}
    return out, facts_by_name, read_s


def run(n_specs: int, n_hosts: int) -> dict:
    hosts = fleet(n_hosts)
    todo, facts, read_s = specs(n_specs)
    cache = PlanCache()
    load: dict[str, HostLoad] = {}
    placed = unplaced = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for spec in todo:
        p = place(spec, facts[spec.name], hosts, load, cache)
        load = p.load_after(load)
        placed += len(p.placed)
        unplaced += spec.replicas - len(p.placed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "specs": n_specs,
        "hosts": n_hosts,
        "plans_made": cache.misses,
        "replicas_placed": placed,
        "replicas_unplaced": unplaced,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "per_placement_us": round(wall / n_specs * 1e6),
        "model_read_s": round(read_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = [run(50, 10), run(500, 100), run(1000, 200)]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---:" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
