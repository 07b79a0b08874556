"""Fleet placement (issue 12): which hosts run a spec's replicas, and the trace that says why.

The model is real (Llama 3 8B's config and safetensors headers from the warm Hub cache in
specs/hub, planned by the real planner); the hosts are declared inventories, since this
machine has no GPU: what that proves is the placement rules and numbers, not a running host.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.commands.schema import schema_text
from cli.main import main
from cortex.facts import ModelFacts, facts_for_source
from cortex.fleet.hosts import Slot
from cortex.fleet.inventory import HostInventory, load_hosts, local_inventory, parse_hosts_text
from cortex.fleet.placement import HostLoad, PlanCache, place
from cortex.spec import ModelSpec
from cortex.specfile import SpecError

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
LLAMA_8B = {"repo": "meta-llama/Meta-Llama-3-8B-Instruct"}
H100_MIB = 81559


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def facts() -> ModelFacts:
    return facts_for_source(ModelSpec.model_validate({"name": "m", "source": LLAMA_8B}).source, spec_dir=SPECS)


def spec(**fields: Any) -> ModelSpec:
    data: dict[str, Any] = {
        "name": "llama",
        "source": LLAMA_8B,
        "runtime": "docker",
        "resources": {"gpus": 1, "context_length": 8192},
    }
    data.update(fields)
    return ModelSpec.model_validate(data)


def host(name: str, gpus: int = 1, free_mib: int = 81000, **fields: Any) -> HostInventory:
    data: dict[str, Any] = {
        "name": name,
        "address": f"{name}.lab",
        "gpus": [{"name": "H100", "memory_total_mib": H100_MIB, "memory_free_mib": free_mib}] * gpus,
        "cpu_cores": 32,
        "ram_bytes": "256GiB",
        "runtimes": ["docker", "process"],
    }
    data.update(fields)
    return HostInventory.model_validate(data)


def trace(p: Any, name: str) -> Any:
    return next(t for t in p.hosts if t.host == name)


def test_two_replicas_land_on_two_hosts(facts: ModelFacts) -> None:
    p = place(spec(replicas=2), facts, [host("gpu-a"), host("gpu-b"), host("gpu-c", free_mib=70000)])
    assert p.ok and [r.host for r in p.placed] == ["gpu-a", "gpu-b"]
    assert {r.plan.engine for r in p.placed} == {"vllm"}
    assert trace(p, "gpu-a").reason.startswith("chosen for replica 1")
    # gpu-c fits but has less memory left after placement than either winner
    c = trace(p, "gpu-c")
    assert c.fits and not c.chosen
    assert "passed over for replica 2: gpu-b has more memory left" in c.reason


def test_label_selector_picks_only_matching_hosts(facts: ModelFacts) -> None:
    hosts = [host("a100-1", labels={"gpu": "a100"}), host("h100-1", free_mib=60000, labels={"gpu": "h100"})]
    p = place(spec(placement={"labels": {"gpu": "h100"}}), facts, hosts)
    assert [r.host for r in p.placed] == ["h100-1"]
    a = trace(p, "a100-1")
    assert a.missing_labels == ["gpu=h100 (has gpu=a100)"]
    assert a.reason == "labels do not match: wants gpu=h100 (has gpu=a100) (the plan would fit)"


def test_allow_list_keeps_other_hosts_out(facts: ModelFacts) -> None:
    p = place(spec(placement={"hosts": ["GPU-B"]}), facts, [host("gpu-a"), host("gpu-b", free_mib=60000)])
    assert [r.host for r in p.placed] == ["gpu-b"]  # host names compare as DNS does: ignoring case
    assert trace(p, "gpu-a").reason == "not in placement.hosts (the plan would fit)"


def test_runtime_must_be_on_the_host(facts: ModelFacts) -> None:
    p = place(spec(), facts, [host("gpu-a", runtimes=["process"])])
    assert not p.ok
    assert trace(p, "gpu-a").reason == "no docker runtime there (the plan would fit)"
    assert p.shortfall == "no host is eligible among 1: 1 without the docker runtime"
    assert p.would_fit == ["gpu-a fits but is left out: no docker runtime there"]


def test_no_host_fits_says_by_how_much_and_what_would(facts: ModelFacts) -> None:
    # Q8_0 of 8.03B parameters is ~8 GB of weights: more than an 8 GiB GPU holds with the KV cache
    s = spec(engine="llamacpp", quantization="Q8_0")
    hosts = [host("small-1", free_mib=8192), host("small-2", free_mib=6144)]
    p = place(s, facts, hosts)
    assert not p.ok and p.placed == []
    closest = trace(p, "small-1")
    short = max(d.total_bytes - d.capacity_bytes for d in closest.plan.devices)  # the GPU (llama.cpp also plans cpu)
    assert short > 0
    assert p.shortfall is not None
    assert "no host fits: needs" in p.shortfall and "the closest host, small-1, has 8.00 GiB" in p.shortfall
    assert p.shortfall.endswith(f"{short / 2**30:.2f} GiB short")
    assert any(w.startswith("on small-1: a smaller quantization: ") for w in p.would_fit)
    assert trace(p, "small-2").reason.startswith("does not fit: cuda:0 needs")


def test_fewer_replicas_would_fit(facts: ModelFacts) -> None:
    p = place(spec(replicas=3), facts, [host("gpu-a"), host("gpu-b")])
    assert [r.host for r in p.placed] == ["gpu-a", "gpu-b"]
    assert not p.ok
    assert p.shortfall is not None and p.shortfall.startswith("replica 3 of 3: every host that fits is full")
    assert "cuda:0 has" in p.shortfall and "left beside" in p.shortfall
    assert "fewer replicas: 2" in p.would_fit


def test_spread_shares_hosts_when_there_are_fewer_hosts_than_replicas(facts: ModelFacts) -> None:
    p = place(spec(replicas=3), facts, [host("gpu-a", gpus=2), host("gpu-b", gpus=2)])
    assert p.ok
    assert [(r.host, list(r.devices.values())) for r in p.placed] == [
        ("gpu-a", ["cuda:0"]),
        ("gpu-b", ["cuda:0"]),
        ("gpu-a", ["cuda:1"]),  # the plan's cuda:0 moves to the free GPU of the same kind
    ]
    assert p.notes == ["spread: 3 replicas over 2 eligible hosts: from replica 3 on, replicas share hosts"]
    assert trace(p, "gpu-a").reason.endswith("(shares the host: fewer eligible hosts than replicas)")


def test_spread_none_packs_onto_the_least_loaded_host(facts: ModelFacts) -> None:
    hosts = [host("big", gpus=4), host("small", gpus=1)]
    p = place(spec(replicas=2, placement={"spread": "none"}), facts, hosts)
    assert [r.host for r in p.placed] == ["big", "big"]
    assert p.notes == []


def test_least_loaded_wins(facts: ModelFacts) -> None:
    hosts = [host("gpu-a", gpus=2), host("gpu-b", gpus=2)]
    first = place(spec(name="other"), facts, hosts)
    assert [r.host for r in first.placed] == ["gpu-a"]  # a tie: the name decides
    assert "the tie goes to the name" in trace(first, "gpu-b").reason
    load = first.load_after()
    assert load["gpu-a"].models == ["other"] and load["gpu-a"].committed["cuda:0"] > 0
    second = place(spec(), facts, hosts, load)
    assert [r.host for r in second.placed] == ["gpu-b"]
    a, b = trace(second, "gpu-a"), trace(second, "gpu-b")
    assert b.free_after is not None and a.free_before < b.free_before
    assert "gpu-b has more memory left after placement" in a.reason
    assert second.load_after(load)["gpu-b"].models == ["llama"]
    assert "gpu-b" not in load and load["gpu-a"].models == ["other"]  # the load passed in is not changed


def test_existing_load_is_never_changed(facts: ModelFacts) -> None:
    existing = {"gpu-a": HostLoad({"cpu": 5}, ["x"])}
    p = place(spec(replicas=2, placement={"spread": "none"}), facts, [host("gpu-a", gpus=2)], existing)
    assert p.ok
    assert existing["gpu-a"].committed == {"cpu": 5} and existing["gpu-a"].models == ["x"]
    assert p.load_after(existing)["gpu-a"].models == ["x", "llama", "llama"]


def test_gpu_hosts_beat_cpu_hosts(facts: ModelFacts) -> None:
    s = spec(engine="llamacpp", quantization="Q4_K_M", resources={"context_length": 2048})
    hosts = [host("cpu-box", gpus=0, ram_bytes="2TiB"), host("gpu-a", gpus=1)]
    p = place(s, facts, hosts)
    assert [r.host for r in p.placed] == ["gpu-a"]
    assert trace(p, "cpu-box").reason == "fits, passed over for replica 1: gpu-a runs it on GPUs, this host only on CPU"


def test_placement_is_deterministic(facts: ModelFacts) -> None:
    hosts = [host(f"gpu-{i:02d}", gpus=1 + i % 3) for i in range(12)]
    want = place(spec(replicas=4), facts, hosts).to_json()
    rng = random.Random(7)
    for _ in range(5):
        shuffled = hosts[:]
        rng.shuffle(shuffled)
        assert place(spec(replicas=4), facts, shuffled, cache=PlanCache()).to_json() == want


def test_plans_are_made_once_per_hardware_shape(facts: ModelFacts) -> None:
    cache = PlanCache()
    hosts = [host(f"h-{i}", gpus=1 + i % 2) for i in range(20)]
    for i in range(10):
        place(spec(name=f"m-{i}"), facts, hosts, cache=cache)  # names differ: the plan does not
    assert cache.misses == 2


def test_a_gpu_count_the_host_lacks_is_a_reason(facts: ModelFacts) -> None:
    p = place(spec(resources={"gpus": 2}), facts, [host("one-gpu")])
    assert trace(p, "one-gpu").reason == "cannot plan: has 1 GPU, resources.gpus asks for 2"
    assert p.shortfall == "no host can be planned for: one-gpu: has 1 GPU, resources.gpus asks for 2"


# --------------------------------------------------------------------------- hosts files

GOOD_HOSTS = """\
- name: gpu-a
  address: 10.0.0.1
  labels: {gpu: h100}
  gpus:
    - {name: H100, memory_total_mib: 81559, memory_free_mib: 81000}
  cpu_cores: 32
  ram_bytes: 256GiB
  runtimes: [docker, process]
- name: gpu-b
  address: gpu-b.lab
  gpus:
    - {name: T4, memory_total_mib: 15360, memory_free_mib: 15000}
  cpu_cores: 8
  ram_bytes: 68719476736
  runtimes: [docker]
"""

BAD_HOSTS = [
    ("", 1, "(hosts)", "empty"),
    ("name: gpu-a\n", 1, "(hosts)", "not a dict"),
    ("- name: gpu a\n  address: x\n  cpu_cores: 1\n  ram_bytes: 1GiB\n", 1, "[0].name", "not a host name"),
    ("- name: a\n  address: x\n  cpu_cores: 1\n", 1, "[0].ram_bytes", "required"),
    (
        GOOD_HOSTS + "- name: c\n  address: c\n  cpu_cores: 0\n  ram_bytes: 1GiB\n",
        18,
        "[2].cpu_cores",
        "greater than or equal to 1",
    ),
    (GOOD_HOSTS.replace("memory_free_mib: 15000", "memory_free_mib: 99999"), 12, "[1].gpus[0]", "more than"),
    (GOOD_HOSTS.replace("runtimes: [docker]", "runtimes: [k8s]"), 15, "[1].runtimes[0]", "'docker' or 'process'"),
    (GOOD_HOSTS.replace("labels: {gpu: h100}", "labels: {gpu: 100}"), 3, "[0].labels", "quote it"),
    (GOOD_HOSTS.replace("cpu_cores: 8", "cpu_core: 8"), 13, "[1].cpu_core", "did you mean 'cpu_cores'"),
    (GOOD_HOSTS.replace("name: gpu-b", "name: GPU-A"), 9, "[1].name", "listed twice (first on line 1)"),
    ("- name: a\n  address: 'not an address'\n  cpu_cores: 1\n  ram_bytes: 1GiB\n", 2, "[0].address", "neither"),
    ("- [1, 2\n", 2, "(yaml)", "YAML syntax"),
]


@pytest.mark.parametrize("text,line,field,fragment", BAD_HOSTS)
def test_bad_hosts_files_name_file_line_field(text: str, line: int, field: str, fragment: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_hosts_text(text, "hosts.yaml")
    assert any(
        (p.file, p.line, p.field) == ("hosts.yaml", line, field) and fragment in p.message for p in e.value.problems
    ), str(e.value)


def test_hosts_file_yaml_and_json_agree(tmp_path: Path) -> None:
    hosts = parse_hosts_text(GOOD_HOSTS, "hosts.yaml")
    assert [h.name for h in hosts] == ["gpu-a", "gpu-b"]
    assert hosts[1].ram_bytes == 64 * 2**30 and hosts[0].ram_bytes == 256 * 2**30
    as_json = tmp_path / "hosts.json"
    as_json.write_text(json.dumps([h.model_dump(mode="json") for h in hosts]))
    assert load_hosts(as_json) == hosts
    with pytest.raises(SpecError, match="no such file"):
        load_hosts(tmp_path / "missing.yaml")


def test_local_inventory_is_this_machine() -> None:
    inv = local_inventory()
    assert inv.cpu_cores == os.cpu_count()
    assert "process" in inv.runtimes and inv.ram_bytes > 0 and inv.collected_at is not None
    assert HostInventory.model_validate_json(inv.model_dump_json()) == inv


def test_schema_has_replicas_and_placement() -> None:
    schema = json.loads(schema_text())
    assert schema["properties"]["replicas"]["minimum"] == 1
    placement = schema["$defs"]["PlacementSpec"]["properties"]
    assert set(placement) == {"hosts", "labels", "spread"}
    assert placement["spread"]["enum"] == ["host", "none"]


# --------------------------------------------------------------------------- cortex plan --fleet


def test_cli_plan_fleet_on_a_hosts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(GOOD_HOSTS)
    spec_file = str(SPECS / "llama-3-8b-instruct.yaml")
    assert main(["plan", spec_file, "--fleet", "--hosts", str(hosts)]) == 0
    out = capsys.readouterr().out
    assert f"fleet: 2 hosts from {hosts}" in out
    assert "replica 1 -> gpu-a (10.0.0.1): vllm, cuda:0" in out
    assert "does not fit: each GPU needs" in out  # gpu-b: a T4 is too small for BF16 8B
    assert main(["plan", spec_file, "--hosts", str(hosts), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and [r["host"] for r in data["placed"]] == ["gpu-a"]
    assert [h["host"] for h in data["hosts"]] == ["gpu-a", "gpu-b"]
    assert data["hosts"][1]["fits"] is False and data["hosts"][1]["shortfall"]


def test_cli_plan_fleet_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(GOOD_HOSTS.replace("cpu_cores: 8", "cpu_cores: -8"))
    spec_file = str(SPECS / "llama-3-8b-instruct.yaml")
    assert main(["plan", spec_file, "--hosts", str(hosts)]) == 2
    assert f"{hosts}:13: [1].cpu_cores: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["plan", spec_file, "--fleet", "--gpus", "2"]) == 2
    assert "--gpus and --gpu-memory plan for one declared machine" in capsys.readouterr().err


def test_cli_plan_fleet_without_hosts_is_this_machine() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "plan", str(SPECS / "llama-3-8b-instruct.yaml"), "--fleet", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["fleet"] == "this machine (local inventory; no --hosts given)"
    assert [h["host"] for h in data["hosts"]] == [local_inventory().name]


# --- fleet rollout and reconcile steps (cortex.fleet.rollout) ---------------------------------


def test_two_replicas_on_one_host_each_take_their_memory(facts: ModelFacts) -> None:
    """A host an allow-list names alone takes a second replica only where both fit: each placed
    replica counts against the host's memory for the next."""
    s = spec(engine="llamacpp", quantization="Q4_K_M", resources={"context_length": 2048})
    one = place(s, facts, [host("cpu-a", gpus=0, ram_bytes="64GiB")])
    need = one.placed[0].need["cpu"]
    # room for two replicas and half of a third
    box = host("cpu-a", gpus=0, ram_bytes=int(need * 2.5))
    p = place(
        s.model_copy(update={"replicas": 3, "placement": s.placement.model_copy(update={"hosts": ["cpu-a"]})}),
        facts,
        [box],
    )
    assert [r.host for r in p.placed] == ["cpu-a", "cpu-a"]
    assert [r.free_after for r in p.placed] == [int(need * 2.5) - need, int(need * 2.5) - 2 * need]
    assert p.shortfall is not None and p.shortfall.startswith("replica 3 of 3: every host that fits is full")
    assert "cpu has" in p.shortfall and "left beside" in p.shortfall
    assert p.load_after()["cpu-a"].committed == {"cpu": 2 * need}


def test_a_rolling_update_swaps_the_hosts_that_hold_a_replica_one_by_one(facts: ModelFacts) -> None:
    from cortex.fleet.rollout import rollout_steps

    # gpu-b runs the old replica in most of its memory: the new one does not fit beside it
    p = place(spec(replicas=2), facts, [host("gpu-a"), host("gpu-b", free_mib=4000), host("gpu-c")])
    steps = rollout_steps(p, [Slot("gpu-b"), Slot("gpu-a")])
    assert [(s.host, s.action) for s in steps] == [("gpu-a", "swap"), ("gpu-b", "stop-then-deploy")]
    assert "capacity N-1 during this swap" in steps[1].why


def test_a_rollout_adds_before_it_swaps_and_retires_last(facts: ModelFacts) -> None:
    from cortex.fleet.rollout import rollout_steps

    hosts = [
        host("gpu-a", labels={"zone": "b"}),
        host("gpu-b", labels={"zone": "a"}),
        host("gpu-c", labels={"zone": "a"}),
    ]
    p = place(spec(replicas=2, placement={"labels": {"zone": "a"}}), facts, hosts)
    # gpu-a held a replica before the spec asked for zone a; gpu-b still qualifies
    steps = rollout_steps(p, [Slot("gpu-a"), Slot("gpu-b")])
    assert [(s.host, s.action) for s in steps] == [("gpu-c", "add"), ("gpu-b", "swap"), ("gpu-a", "retire")]
    assert "labels do not match" in steps[2].why
    # a first apply: nothing holds a replica, every placed host is added
    assert [(s.host, s.action) for s in rollout_steps(p, [])] == [("gpu-b", "add"), ("gpu-c", "add")]


def test_replicas_that_share_a_host_are_its_instances(facts: ModelFacts) -> None:
    from cortex.fleet.rollout import rollout_steps

    one_host = spec(replicas=2, placement={"hosts": ["gpu-a"]})
    p = place(one_host, facts, [host("gpu-a", gpus=2), host("gpu-b", gpus=2)])
    # a first apply: instance 0 and instance 1 of gpu-a, each its own deploy
    first = rollout_steps(p, [])
    assert [(s.host, s.instance, s.action) for s in first] == [("gpu-a", 0, "add"), ("gpu-a", 1, "add")]
    assert [str(s.slot) for s in first] == ["gpu-a", "gpu-a_1"]
    # the rolling update swaps them one at a time, instance 0 first
    update = rollout_steps(p, [Slot("gpu-a", 1), Slot("gpu-a", 0)])
    assert [(s.host, s.instance, s.action) for s in update] == [("gpu-a", 0, "swap"), ("gpu-a", 1, "swap")]
    assert update[1].to_json() | {"why": ""} == {
        "host": "gpu-a",
        "instance": 1,
        "replica": "gpu-a_1",
        "action": "swap",
        "why": "",
    }
    # one replica fewer: the instance beyond the first is retired, the spread is kept
    shrink = place(spec(replicas=2), facts, [host("gpu-a", gpus=2), host("gpu-b", gpus=2)])
    steps = rollout_steps(shrink, [Slot("gpu-a", 0), Slot("gpu-a", 1), Slot("gpu-b", 0)])
    assert [(str(s.slot), s.action) for s in steps] == [("gpu-a", "swap"), ("gpu-b", "swap"), ("gpu-a_1", "retire")]
    assert steps[2].why == "more replicas than the spec wants"


def test_a_slot_is_written_as_the_replica_name_ends() -> None:
    from cortex.runtime.rollout import instance_of, replica_suffix, same_launch

    assert [str(Slot("gpu-1")), str(Slot("gpu-1", 2))] == ["gpu-1", "gpu-1_2"]
    assert Slot.parse("gpu-1.lab_2") == Slot("gpu-1.lab", 2) and Slot.parse("gpu-1") == Slot("gpu-1", 0)
    name = "llamacpp-model-m-0123abcd"
    assert [name + replica_suffix("GPU-1"), name + replica_suffix("gpu-1", 2)] == [f"{name}-gpu-1", f"{name}-gpu-1_2"]
    assert instance_of(f"{name}-gpu-1", "gpu-1") == 0 and instance_of(f"{name}-gpu-1_2", "gpu-1") == 2
    # a host named gpu is not gpu-1, and a replica from before the host joined is no instance
    assert instance_of(f"{name}-gpu-1", "gpu") is None and instance_of(name, "gpu-1") is None
    assert same_launch(f"{name}-gpu-1", f"{name}-gpu-1_3", "gpu-1")
    assert not same_launch(f"{name}-gpu-1", "llamacpp-model-m-ffffffff-gpu-1_1", "gpu-1")


def test_a_host_deploy_replaces_only_its_own_instance() -> None:
    from cortex.runtime.rollout import replaced_by

    old = ["llamacpp-model-m-ffffffff-h1", "llamacpp-model-m-ffffffff-h1_1", "llamacpp-model-m-ffffffff"]
    # instance 0 replaces its older replica and one from before the host joined, not instance 1
    assert replaced_by("h1", 0, old) == [old[0], old[2]]
    assert replaced_by("h1", 1, old) == [old[1]]
    # a single machine replaces every other replica of the model, as it always did
    assert replaced_by(None, 0, old) == old


def test_reconcile_replaces_a_lost_host_and_retires_its_replica_when_it_returns() -> None:
    from cortex.fleet.rollout import reconcile_steps

    h1, h2, h3 = Slot("h1"), Slot("h2"), Slot("h3")
    lost = reconcile_steps(2, [h1, h2], ["h2", "h3"], {h2: True})
    assert (lost.alive, lost.missing, lost.candidates, lost.stale) == ([h2], 1, ["h2", "h3"], [])
    # h1 is back with the replica whose engine died with it; h3 runs the replacement
    back = reconcile_steps(2, [h2, h3], ["h1", "h2", "h3"], {h1: False, h2: True, h3: True})
    assert (back.alive, back.missing, back.stale) == ([h2, h3], 0, [h1])
    # an online host whose engine stopped answering counts as lost, and may be picked again
    dead = reconcile_steps(1, [h1], ["h1", "h2"], {h1: False})
    assert (dead.alive, dead.missing, dead.candidates, dead.stale) == ([], 1, ["h1", "h2"], [h1])


def test_reconcile_counts_instances_and_numbers_new_ones() -> None:
    from cortex.fleet.rollout import new_slots, reconcile_steps

    a0, a1 = Slot("h1"), Slot("h1", 1)
    # instance 1's engine died: one missing; instance 0 stays; the dead one is stale
    plan = reconcile_steps(2, [a0, a1], ["h1"], {a0: True, a1: False})
    assert (plan.alive, plan.missing, plan.candidates, plan.stale) == ([a0], 1, ["h1"], [a1])
    # placed on h1 again: it takes instance 1 (its deploy replaces the dead replica there)
    assert new_slots(["h1"], plan.alive) == [a1]
    assert new_slots(["h1", "h1", "h2"], [a1]) == [a0, Slot("h1", 2), Slot("h2")]


def test_a_declared_ram_budget_is_offered_less_what_its_replicas_plan_to_take(facts: ModelFacts) -> None:
    from cortex.fleet.inventory import offered_ram
    from cortex.launch import build_launch

    gib, mib = 2**30, 2**20
    assert offered_ram(64 * gib, None, 10 * gib) == 64 * gib  # no budget: what is available (measured)
    assert offered_ram(64 * gib, 1 * gib, 300 * mib) == 724 * mib
    assert offered_ram(512 * mib, 1 * gib, 0) == 512 * mib  # never more than is available
    assert offered_ram(64 * gib, 1 * gib, 2 * gib) == 0
    # what a replica plans to take travels with its launch (a label both runtimes keep)
    s = spec(engine="llamacpp", quantization="Q4_K_M", resources={"context_length": 2048})
    p = place(s, facts, [host("cpu-a", gpus=0)])
    assert build_launch(s, p.placed[0].plan).planned_ram == p.placed[0].need["cpu"] > 0
