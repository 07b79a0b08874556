"""A fleet of three hosts on one machine: Linux network namespaces (tests/netns.py), each host
running `cortex host join` (its own real Prefect worker) and the process runtime, with
llama-server bound to the host's own address. A real Prefect server and the gateway run in the
root namespace. The hosts have no GPUs: serving runs on CPU (SmolLM2 Q4_1), and the spec that
fits no host asks for a GPU.

What this proves: hosts join through Prefect (queue, deployments, inventory, worker liveness);
`cortex deploy --fleet` places a `replicas: 2` spec on two different hosts, each deploy runs on
its host's worker, each replica registers at its host's address and the gateway reaches both; a
label selector keeps a spec to matching hosts; a spec that fits no host fails with the trace;
a spec at a path no host can see (a tmpfs in the control command's own mount namespace)
deploys, since the hosts get its text; a `replicas: 2` spec allowed on one host runs two
llama-servers there (instances 0 and 1: two names, two ports, two routes, both answering); that
host declares a RAM budget (CORTEX_HOST_RAM) with no room for a third replica, so an edit rolls
each instance with the old one stopped first while the other serves (N-1), and `replicas: 1`
then retires instance 1 alone; `cortex host leave` drains and removes a host.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fleet_helpers import REPO, Fleet, RouteWatch, answered_by_each, running_fleet
from fleet_helpers import healthy as _healthy
from fleet_helpers import routes as _routes
from fleet_helpers import wait_for as _wait
from fleet_helpers import write_spec as _spec

pytestmark = pytest.mark.parts


PAIR = "smollm2-pair"


def _pair_spec(gguf: Path, context_length: int, replicas: int) -> str:
    """A spec allowed on h3 alone."""
    return (
        f"name: {PAIR}\nsource:\n  gguf: {gguf}\nruntime: process\nresources:\n  concurrency: 1\n"
        f"  context_length: {context_length}\nreplicas: {replicas}\nplacement:\n  hosts: [h3]\n"
    )


@dataclass(frozen=True)
class Budget:
    """h3's declared RAM (CORTEX_HOST_RAM) and what one replica of the pair spec plans to take
    at each context length, from the real planner (the plans do not depend on the RAM)."""

    ram: int
    need_1024: int
    need_512: int


@pytest.fixture(scope="module")
def budget(test_model) -> Budget:
    from cortex.fleet.inventory import local_inventory
    from cortex.pipeline import place_spec_text
    from cortex.plan import CPU_RAM_SHARE

    def need(context_length: int) -> int:
        host = local_inventory("h3").model_copy(update={"ram_bytes": 1 << 40})
        _, placed = place_spec_text(_pair_spec(test_model.gguf, context_length, 1), "/pair.yaml", [host])
        return placed.placed[0].need["cpu"]

    n1, n2 = need(1024), need(512)
    # A CPU plan fits in CPU_RAM_SHARE of the RAM a host offers. Two replicas at 1024 fit an
    # empty h3; beside them, no room for one at 512 (the rolling update stops each old one
    # first); beside two at 512, room for one (shrinking swaps in place).
    share = CPU_RAM_SHARE
    low, high = max(2 * n1 / share, n2 / share + 2 * n2), n2 / share + 2 * n1
    assert low < high, (n1, n2)
    return Budget(int((low + high) / 2), n1, n2)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, toolchain, test_model, budget: Budget) -> Iterator[Fleet]:
    h3 = {"CORTEX_HOST_RAM": str(budget.ram)}
    with running_fleet(tmp_path_factory.mktemp("fleet"), host_envs={"h3": h3}) as fleet:
        yield fleet


def test_two_replicas_land_on_two_hosts_and_the_gateway_reaches_both(fleet: Fleet, test_model) -> None:
    spec = _spec(fleet, "smollm2", test_model.gguf, "replicas: 2\n")
    done = fleet.cortex("deploy", str(spec), "--fleet", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    placed = {r["host"] for r in json.loads(done.stdout)["placement"]["placed"]}
    assert len(placed) == 2

    routes = _routes(fleet, "smollm2")
    # each replica registered at its own host's address (not 127.0.0.1), named after its host
    by_host = {h.name: h for h in fleet.hosts}
    assert sorted(rid.rsplit("-", 1)[1] for rid in routes) == sorted(placed)
    for rid, url in routes.items():
        assert url.startswith(f"http://{by_host[rid.rsplit('-', 1)[1]].address}:"), (rid, url)

    # Hold one streaming request open: the gateway sends the next to the replica with fewer in
    # flight, the other one.
    _wait("both replicas healthy in the gateway", lambda: _healthy(fleet, "smollm2") == set(routes), 60)
    assert answered_by_each(fleet, "smollm2") == set(routes)

    # the hosts' inventories list what they run (refreshed every 2 s)
    def listed() -> bool:
        rows = {r["host"]: r for r in fleet.hosts_json()}
        return all(any(n in routes for n in rows[h]["replicas"]) for h in placed)

    _wait("cortex hosts lists the replicas", listed, 60)


def test_a_label_selector_keeps_a_spec_to_matching_hosts_and_a_spec_that_fits_none_fails(
    fleet: Fleet, test_model
) -> None:
    spec = _spec(fleet, "smollm2-b", test_model.gguf, "placement:\n  labels: {zone: b}\n")
    done = fleet.cortex("deploy", str(spec), "--fleet", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    placed = json.loads(done.stdout)["placement"]["placed"]
    assert [(r["host"], r["address"]) for r in placed] == [("h2", fleet.hosts[1].address)]
    assert [rid.rsplit("-", 1)[1] for rid in _routes(fleet, "smollm2-b")] == ["h2"]

    # no host has a GPU: the planner refuses every host, and the error carries each host's reason
    spec = _spec(fleet, "needs-gpu", test_model.gguf, "replicas: 1\n")
    spec.write_text(spec.read_text().replace("resources:\n", "resources:\n  gpus: 1\n"))
    done = fleet.cortex("deploy", str(spec), "--fleet")
    assert done.returncode == 1
    assert "no host can be planned for" in done.stderr, done.stderr[-3000:]
    for host in ("h1", "h2", "h3"):
        assert f"{host}: cannot plan: has 0 GPUs" in done.stderr, done.stderr[-3000:]
    assert _routes(fleet, "needs-gpu") == {}


def test_two_replicas_share_one_host_from_a_spec_no_host_can_see_and_roll_without_room(
    fleet: Fleet, test_model, budget: Budget
) -> None:
    from cortex.applied import text_sha256

    def h3_row() -> dict:
        return {r["host"]: r for r in fleet.hosts_json()}["h3"]

    # an allow-list of one host: both replicas on h3, as its instances 0 and 1
    text = _pair_spec(test_model.gguf, 1024, 2)
    done = fleet.deploy_unseen("pair.yaml", text, "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    assert not any((fleet.home / "control-only").iterdir())  # the spec never was where a host could read it
    result = json.loads(done.stdout)
    assert [r["host"] for r in result["placement"]["placed"]] == ["h3", "h3"]
    assert [(s["host"], s["instance"], s["action"]) for s in result["steps"]] == [("h3", 0, "add"), ("h3", 1, "add")]
    version = f"spec {text_sha256(text)[:12]}"
    assert result["versions"] == {"h3": version, "h3_1": version}
    # h3 wrote the text it was sent to its own state folder, byte for byte, and deployed from it
    copies = list((fleet.home / "h3" / "fleet-specs").glob(f"{PAIR}-*.yaml"))
    assert [c.read_text() for c in copies] == [text]

    routes = _routes(fleet, PAIR)
    assert sorted(rid.rsplit("-", 1)[1] for rid in routes) == ["h3", "h3_1"]
    h3 = fleet.hosts[2].address
    assert all(url.startswith(f"http://{h3}:") for url in routes.values()), routes
    assert len(set(routes.values())) == 2  # two engines, two ports
    _wait("both instances healthy in the gateway", lambda: _healthy(fleet, PAIR) == set(routes), 60)
    assert answered_by_each(fleet, PAIR) == set(routes)
    # cortex hosts lists both on h3, and h3 offers its declared RAM less what they plan to take
    _wait(
        "cortex hosts lists both instances",
        lambda: (
            set(routes) <= set(h3_row()["replicas"]) and h3_row()["ram_free_bytes"] == budget.ram - 2 * budget.need_1024
        ),
        60,
    )

    # The edit (a shorter context) does not fit beside the two: each instance in turn is stopped
    # first, then deployed again, so one of the two keeps serving throughout (N-1)
    text = _pair_spec(test_model.gguf, 512, 2)
    with RouteWatch(fleet, PAIR) as watch:
        done = fleet.deploy_unseen("pair.yaml", text, "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    steps = json.loads(done.stdout)["steps"]
    assert [(s["host"], s["instance"], s["action"]) for s in steps] == [
        ("h3", 0, "stop-then-deploy"),
        ("h3", 1, "stop-then-deploy"),
    ]
    assert all("no room for a second replica beside the old one" in s["why"] for s in steps)
    assert all("the old replica was stopped first (N-1 during this swap)" in s["outcome"] for s in steps)
    assert watch.fewest is not None and watch.fewest >= 1
    rolled = _routes(fleet, PAIR)
    assert sorted(rid.rsplit("-", 1)[1] for rid in rolled) == ["h3", "h3_1"] and not set(rolled) & set(routes)
    _wait(
        "h3 offers what the new replicas leave",
        lambda: (
            set(rolled) <= set(h3_row()["replicas"]) and h3_row()["ram_free_bytes"] == budget.ram - 2 * budget.need_512
        ),
        60,
    )

    # one replica fewer: instance 1 is retired alone, instance 0 (the same launch, with room
    # beside it now) is kept as it runs
    done = fleet.deploy_unseen("pair.yaml", _pair_spec(test_model.gguf, 512, 1), "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    steps = json.loads(done.stdout)["steps"]
    assert [(s["host"], s["instance"], s["action"]) for s in steps] == [("h3", 0, "swap"), ("h3", 1, "retire")]
    kept = next(rid for rid in rolled if rid.endswith("-h3"))
    assert list(_routes(fleet, PAIR)) == [kept]
    with httpx.Client(base_url=fleet.gateway.url, timeout=120) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": PAIR, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
    assert answer.status_code == 200 and answer.headers["x-cortex-replica"] == kept


def test_a_host_that_leaves_drains_its_replicas_and_is_gone(fleet: Fleet) -> None:
    routes = _routes(fleet, "smollm2")
    leaving = min(rid.rsplit("-", 1)[1] for rid in routes)  # a host with a replica of smollm2
    host = next(h for h in fleet.hosts if h.name == leaving)
    done = host.run(
        [sys.executable, "-m", "cli.main", "host", "leave"],
        env=fleet.host_env(host),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard
    )
    assert done.returncode == 0, done.stderr[-3000:]
    left = _routes(fleet, "smollm2")
    assert sorted(left) == sorted(rid for rid in routes if not rid.endswith(f"-{leaving}"))
    _wait(f"{leaving} gone from cortex hosts", lambda: leaving not in {r["host"] for r in fleet.hosts_json()}, 60)
    with httpx.Client(base_url=fleet.gateway.url, timeout=120) as client:  # the other replica still serves
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
    assert answer.status_code == 200 and answer.headers["x-cortex-replica"] in left
