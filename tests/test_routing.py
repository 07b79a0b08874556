"""The gateway's routing table in-process: the affinity key of a request, least-in-flight and
prefix-cache affinity with its load bound, health and draining, and what a rebuild from the
registry keeps, adds and drops (replicas, aliases, keys, fallbacks).

The gateway tests (test_gateway*.py) drive the same code through a gateway in a child process;
these call it directly with the registry's own record types, so a change to a rule shows up
here as a failing test with a name."""

from __future__ import annotations

import json

import pytest

from cortex.gateway.inflight import InFlightBoard
from cortex.gateway.registry import ApiKeyRecord, ReplicaRecord, hash_key
from cortex.gateway.routing import AFFINITY_CHARS, UNCHECKED, Replica, RoutingTable, prefix_key


def record(
    rid: str,
    model: str = "m",
    url: str | None = None,
    *,
    key: str | None = None,
    state: str = "active",
    labels: dict | None = None,
) -> ReplicaRecord:
    return ReplicaRecord(rid, model, url or f"http://127.0.0.1:{9000 + len(rid)}", key, state, labels or {})


def api_key(kid: str, secret: str) -> ApiKeyRecord:
    return ApiKeyRecord(kid, kid, hash_key(secret), None, None, False, 0.0)


def table_of(
    *records: ReplicaRecord,
    affinity: bool = True,
    load_ratio: float = 1.25,
    aliases: dict[str, str] | None = None,
    fallbacks: dict[str, list[str]] | None = None,
) -> RoutingTable:
    table = RoutingTable(2.0, affinity=affinity, load_ratio=load_ratio)
    table.sync(list(records), aliases or {}, [], fallbacks)
    for replica in table.replicas.values():
        replica.healthy, replica.reason = True, ""
    return table


def chat(system: str, *turns: str) -> dict:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def prompt_away_from_first(table: RoutingTable, replicas: list[Replica]) -> tuple[dict, Replica]:
    """A request whose affinity target is not the first replica listed (the least-in-flight
    pick when all are idle), so that a test can tell affinity and least-in-flight apart."""
    for i in range(200):
        payload = {"model": "m", "prompt": f"prompt {i}"}
        target = table.pick(replicas, (), payload)
        assert target is not None
        if target is not replicas[0]:
            return payload, target
    raise AssertionError("every prompt hashed to the first replica")


# --- the affinity key ---------------------------------------------------------------------


def test_every_turn_of_a_conversation_shares_the_key_of_its_opening() -> None:
    first = prefix_key(chat("You are terse.", "What is 2+2?"))
    later = prefix_key(chat("You are terse.", "What is 2+2?", "4.", "And 3+3?", "6.", "And 4+4?"))
    assert first is not None and first == later


def test_conversations_with_another_system_prompt_or_opening_question_get_another_key() -> None:
    base = prefix_key(chat("You are terse.", "What is 2+2?"))
    assert prefix_key(chat("You are verbose.", "What is 2+2?")) != base
    assert prefix_key(chat("You are terse.", "What is 3+3?")) != base


def test_the_role_of_a_message_is_part_of_the_key() -> None:
    as_user = prefix_key({"messages": [{"role": "user", "content": "hello"}]})
    as_system = prefix_key({"messages": [{"role": "system", "content": "hello"}, {"role": "user", "content": ""}]})
    assert as_user is not None and as_system is not None and as_user != as_system
    # the separators keep "role + content" from running together
    assert prefix_key({"messages": [{"role": "user", "content": "xhello"}]}) != prefix_key(
        {"messages": [{"role": "userx", "content": "hello"}]}
    )


def test_the_key_covers_the_first_affinity_chars_of_a_prompt_and_no_more() -> None:
    head = "a" * (AFFINITY_CHARS - 1)
    assert prefix_key({"prompt": head + "x" + "tail one"}) == prefix_key({"prompt": head + "x" + "tail two"})
    assert prefix_key({"prompt": head + "x"}) != prefix_key({"prompt": head + "y"})
    assert prefix_key({"prompt": head}) != prefix_key({"prompt": head + "x"})


def test_a_system_prompt_longer_than_the_key_gives_every_question_the_same_key() -> None:
    system = "rules " * AFFINITY_CHARS
    assert prefix_key(chat(system, "first question")) == prefix_key(chat(system, "another question"))
    # ... cut at AFFINITY_CHARS of the joined messages, whatever comes after
    short = "s" * (AFFINITY_CHARS // 2)
    assert prefix_key(chat(short, "q" * AFFINITY_CHARS + "1")) == prefix_key(chat(short, "q" * AFFINITY_CHARS + "2"))
    assert prefix_key(chat(short, "q1")) != prefix_key(chat(short, "q2"))


def test_structured_content_is_keyed_on_its_json() -> None:
    parts = [{"type": "text", "text": "describe this"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    key = prefix_key({"messages": [{"role": "user", "content": parts}]})
    assert key is not None
    assert key == prefix_key({"messages": [{"role": "user", "content": json.loads(json.dumps(parts))}]})
    assert key != prefix_key({"messages": [{"role": "user", "content": parts[:1]}]})


def test_a_malformed_message_ends_the_keyed_opening() -> None:
    system = {"role": "system", "content": "You are terse."}
    assert prefix_key({"messages": [system, "not a message", {"role": "user", "content": "q"}]}) == prefix_key(
        {"messages": [system, 7]}
    )
    assert prefix_key({"messages": [system, 7]}) is not None
    assert prefix_key({"messages": ["not a message"]}) is None
    assert prefix_key({"messages": []}) is None


def test_completion_prompts_of_token_ids_or_batches_are_keyed() -> None:
    ids = prefix_key({"prompt": [1, 2, 3]})
    assert ids is not None and ids == prefix_key({"prompt": [1, 2, 3]})
    assert ids != prefix_key({"prompt": [1, 2, 4]})
    assert prefix_key({"prompt": ["a", "b"]}) not in (None, prefix_key({"prompt": ["a", "c"]}))
    long_ids = list(range(5000))
    assert prefix_key({"prompt": long_ids}) == prefix_key({"prompt": long_ids + [1]})
    # a batch of long non-ASCII prompts: the cut may fall inside a character's UTF-8 bytes
    batch = ["x" + "é" * 3000]
    key = prefix_key({"prompt": batch})
    assert key is not None and key == prefix_key({"prompt": batch + ["more"]})


def test_a_body_without_a_prompt_has_no_key() -> None:
    assert prefix_key({"model": "m", "input": "embed me"}) is None
    assert prefix_key({"model": "m", "prompt": ""}) is None
    assert prefix_key({"model": "m", "messages": "not a list", "prompt": "p"}) == prefix_key({"prompt": "p"})


def test_the_key_is_64_bits_and_survives_a_lone_surrogate() -> None:
    for payload in ({"prompt": "x"}, {"prompt": "\ud800 unpaired"}, chat("s", "q")):
        key = prefix_key(payload)
        assert key is not None and 0 <= key < 2**64
    assert prefix_key({"prompt": "\ud800"}) != prefix_key({"prompt": "\ud801"})


# --- one replica ----------------------------------------------------------------------------


def test_a_replica_connects_to_its_url_and_waits_for_a_health_check() -> None:
    replica = Replica(record("r1", url="http://10.1.2.3:8123/v1"), 3.5)
    assert (replica.host, replica.port) == ("10.1.2.3", 8123)
    assert (replica.pool.host, replica.pool.port, replica.pool.connect_timeout) == ("10.1.2.3", 8123, 3.5)
    assert not replica.healthy and replica.reason == UNCHECKED and not replica.routable
    bare = Replica(record("r2", url="http://engine"), 1.0)
    assert (bare.host, bare.port) == ("engine", 80)
    assert Replica(record("r3", url="http://:8000"), 1.0).host == "127.0.0.1"


def test_a_replica_is_routable_only_when_active_healthy_and_registered() -> None:
    replica = Replica(record("r1"), 1.0)
    replica.healthy = True
    assert replica.routable
    replica.state = "draining"
    assert not replica.routable
    replica.state, replica.removed = "active", True
    assert not replica.routable
    replica.removed, replica.healthy = False, False
    assert not replica.routable


def test_the_request_head_names_the_host_and_carries_the_engine_key_only_when_set() -> None:
    replica = Replica(record("r1", url="http://10.0.0.5:8080", key="sk-engine"), 1.0)
    assert replica.request_head == b"Host: 10.0.0.5:8080\r\nAuthorization: Bearer sk-engine\r\n"
    replica.update(record("r1", url="http://10.0.0.5:8080", state="draining", labels={"gpu": "h200"}))
    assert replica.request_head == b"Host: 10.0.0.5:8080\r\n"
    assert (replica.state, replica.labels, replica.engine_api_key) == ("draining", {"gpu": "h200"}, None)


def test_a_replicas_public_view_shows_its_state_and_load_but_not_its_engine_key() -> None:
    replica = Replica(record("r1", "llama", "http://h:1", key="sk-secret", labels={"zone": "a"}), 1.0)
    replica.count.add(3)
    view = replica.public()
    assert view == {
        "id": "r1",
        "model": "llama",
        "url": "http://h:1",
        "state": "active",
        "healthy": False,
        "reason": UNCHECKED,
        "in_flight": 3,
        "labels": {"zone": "a"},
    }
    assert "sk-secret" not in repr(view)


def test_the_rendezvous_seed_depends_on_the_replica_id_only() -> None:
    a = Replica(record("replica-a", url="http://h:1"), 1.0)
    assert a.seed == Replica(record("replica-a", "other-model", "http://elsewhere:2"), 9.0).seed
    assert a.seed != Replica(record("replica-b", url="http://h:1"), 1.0).seed
    assert 0 <= a.seed < 2**64


# --- least in flight, health, draining ----------------------------------------------------


def test_a_request_goes_to_the_replica_with_the_fewest_requests_in_flight() -> None:
    table = table_of(record("a"), record("b"), record("c"), affinity=False)
    a, b, c = table.models["m"]
    a.count.add(2)
    b.count.add(1)
    c.count.add(3)
    assert table.pick(table.models["m"]) is b
    b.count.add(2)
    assert table.pick(table.models["m"]) is a


def test_unhealthy_draining_removed_and_tried_replicas_are_skipped() -> None:
    table = table_of(record("a"), record("b"), record("c"), record("d"), affinity=False)
    replicas = table.models["m"]
    a, b, c, d = replicas
    for r, load in zip(replicas, (0, 1, 2, 3)):
        r.count.add(load)
    a.healthy = False
    assert table.pick(replicas) is b
    b.state = "draining"
    assert table.pick(replicas) is c
    c.removed = True
    assert table.pick(replicas) is d
    assert table.pick(replicas, tried=(d,)) is None


def test_no_routable_replica_gives_none() -> None:
    table = table_of(record("a"))
    assert table.pick([]) is None
    table.models["m"][0].healthy = False
    assert table.pick(table.models["m"], (), {"prompt": "p"}) is None


def test_least_in_flight_counts_every_workers_requests_on_the_shared_board() -> None:
    board = InFlightBoard(workers=2, slots=64)
    board.attach(0)
    table = RoutingTable(1.0, affinity=False, board=board)
    table.sync([record("a"), record("b")], {}, [])
    a, b = table.models["m"]
    a.healthy = b.healthy = True
    b.count.add(1)  # this worker: one request on b
    board.attach(1)  # the other worker (same shared memory, as after fork): three on a
    board.count("a").add(3)
    board.attach(0)
    assert (a.in_flight, b.in_flight) == (3, 1)
    assert table.pick([a, b]) is b


# --- prefix-cache affinity and its load bound --------------------------------------------


def test_requests_with_the_same_prompt_prefix_go_to_the_same_replica_even_when_it_is_busier() -> None:
    table = table_of(record("a"), record("b"), record("c"))
    replicas = table.models["m"]
    payload, target = prompt_away_from_first(table, replicas)
    target.count.add(1)  # busier than the others, within the bound: 1 <= 1.25 x (1/3 + 1)
    for _ in range(3):
        assert table.pick(replicas, (), payload) is target
    # the same key in another order of the list, and in another gateway built from the registry
    assert table.pick(list(reversed(replicas)), (), payload) is target
    other = table_of(record("c"), record("a"), record("b"))
    assert other.pick(other.models["m"], (), payload).id == target.id


def test_affinity_spreads_distinct_prompts_over_the_replicas() -> None:
    table = table_of(*(record(f"r{i}") for i in range(4)))
    replicas = table.models["m"]
    shares = {r.id: 0 for r in replicas}
    for i in range(400):
        shares[table.pick(replicas, (), {"prompt": f"system prompt number {i}"}).id] += 1
    assert all(40 <= n <= 160 for n in shares.values()), shares


def test_a_replica_leaving_moves_only_its_own_prefixes() -> None:
    table = table_of(*(record(f"r{i}") for i in range(4)))
    replicas = table.models["m"]
    prompts = [{"prompt": f"conversation {i}"} for i in range(200)]
    before = [table.pick(replicas, (), p) for p in prompts]
    leaving = replicas[2]
    leaving.healthy = False
    after = [table.pick(replicas, (), p) for p in prompts]
    moved = [i for i in range(len(prompts)) if after[i] is not before[i]]
    assert moved and all(before[i] is leaving for i in moved)
    assert all(r is not leaving for r in after)


def test_affinity_needs_two_routable_replicas_a_prompt_and_the_setting() -> None:
    for affinity, payload in (
        (False, "keyed"),  # affinity off: least in flight
        (True, None),  # no body
        (True, [1, 2]),  # a body that is not an object
        (True, {"model": "m", "input": "embed"}),  # no prompt to key on
    ):
        table = table_of(record("a"), record("b"), record("c"), affinity=affinity)
        replicas = table.models["m"]
        keyed, _ = prompt_away_from_first(table_of(record("a"), record("b"), record("c")), replicas)
        body = keyed if payload == "keyed" else payload
        assert table.pick(replicas, (), body) is replicas[0], (affinity, payload)
    # one routable replica: it takes everything; two: affinity applies
    table = table_of(record("a"), record("b"), record("c"))
    replicas = table.models["m"]
    payload, target = prompt_away_from_first(table, replicas[:2])
    assert target is replicas[1]
    replicas[1].count.add(1)
    assert table.pick(replicas[:2], (), payload) is replicas[1]
    replicas[0].healthy = False
    assert table.pick(replicas[:2], (), payload) is replicas[1]
    replicas[0].healthy, replicas[1].healthy = True, False
    assert table.pick(replicas[:2], (), payload) is replicas[0]


def test_affinity_never_picks_a_tried_unhealthy_draining_or_removed_replica() -> None:
    for spoil in ("tried", "healthy", "state", "removed"):
        table = table_of(record("a"), record("b"), record("c"))
        replicas = table.models["m"]
        payload, target = prompt_away_from_first(table, replicas)
        tried: tuple[Replica, ...] = ()
        if spoil == "tried":
            tried = (target,)
        elif spoil == "healthy":
            target.healthy = False
        elif spoil == "state":
            target.state = "draining"
        else:
            target.removed = True
        picked = table.pick(replicas, tried, payload)
        assert picked is not None and picked is not target, spoil


def test_the_load_bound_sends_a_request_to_the_least_busy_replica_only_past_ratio_times_mean_plus_one() -> None:
    # two replicas, the other idle: the bound is ratio x (load/2 + 1)
    def pick_with(load: int, ratio: float) -> bool:
        table = table_of(record("a"), record("b"), load_ratio=ratio)
        replicas = table.models["m"]
        payload, target = prompt_away_from_first(table, replicas)
        target.count.add(load)
        kept = table.pick(replicas, (), payload) is target
        assert (table.pick(list(reversed(replicas)), (), payload) is target) == kept  # the mean is of all of them
        return kept

    assert pick_with(2, 1.0)  # 2 is not more than 1.0 x (1 + 1)
    assert not pick_with(3, 1.0)  # 3 > 1.0 x (1.5 + 1)
    assert pick_with(3, 1.25)  # 3 <= 1.25 x 2.5
    assert not pick_with(4, 1.25)  # 4 > 1.25 x 3
    assert pick_with(8, 2.0)  # 8 <= 2 x 5


def test_the_load_bound_counts_only_the_replicas_still_to_try() -> None:
    # three replicas: the target carries 2, a tried one 10 (left out of the mean), the third 0
    table = table_of(record("a"), record("b"), record("c"), load_ratio=1.0)
    replicas = table.models["m"]
    payload, target = prompt_away_from_first(table, replicas)
    others = [r for r in replicas if r is not target]
    target.count.add(2)
    others[0].count.add(10)
    # without the tried one: mean 1, bound 2: the target keeps it; with it the mean would be 4
    assert table.pick(replicas, (others[0],), payload) is target
    target.count.add(1)
    assert table.pick(replicas, (others[0],), payload) is others[1]


# --- rebuilding from the registry ---------------------------------------------------------


def test_a_rebuild_keeps_health_and_load_of_unchanged_replicas_and_applies_their_new_state() -> None:
    table = table_of(record("a"), record("b"))
    a = table.replicas["a"]
    a.count.add(2)
    gone = table.sync([record("a", state="draining", labels={"x": "1"}, key="k2"), record("b")], {}, [])
    assert gone == []
    assert table.replicas["a"] is a and a.healthy and a.in_flight == 2
    assert a.state == "draining" and a.labels == {"x": "1"} and b"Bearer k2" in a.request_head
    assert a.engine_api_key == "k2"  # what its health check authenticates with
    assert table.available_models() == ["m"]


def test_a_replica_that_moved_or_changed_model_is_new_and_unchecked_and_the_old_one_is_dropped() -> None:
    table = table_of(record("a", url="http://h:1"), record("b", "m2", "http://h:2"))
    old_a, old_b = table.replicas["a"], table.replicas["b"]
    gone = table.sync([record("a", url="http://h:9"), record("b", "m3", "http://h:2")], {}, [])
    assert set(gone) == {old_a, old_b} and old_a.removed and old_b.removed
    new_a = table.replicas["a"]
    assert new_a is not old_a and new_a.port == 9 and not new_a.healthy and new_a.reason == UNCHECKED
    assert new_a.pool.connect_timeout == 2.0  # the table's connect timeout
    assert set(table.models) == {"m", "m3"}


def test_a_deregistered_replica_is_returned_removed_and_its_model_forgotten() -> None:
    table = table_of(record("a"), record("b", "other"))
    b = table.replicas["b"]
    gone = table.sync([record("a")], {}, [])
    assert gone == [b] and b.removed and not b.routable
    assert "other" not in table.models and set(table.replicas) == {"a"}
    assert table.pick([b]) is None


def test_aliases_route_to_their_models_replicas_but_never_shadow_a_served_name() -> None:
    table = table_of(
        record("a", "llama"),
        record("b", "qwen"),
        aliases={"chat": "llama", "qwen": "llama", "ghost": "not-deployed", "fast": "llama"},
    )
    assert table.models["chat"] is table.models["llama"] and table.canonical["chat"] == "llama"
    assert table.models["qwen"] == [table.replicas["b"]] and table.canonical["qwen"] == "qwen"
    assert "ghost" not in table.models and "ghost" not in table.canonical
    assert table.aliases_of == {"llama": ["chat", "fast"]}
    assert sorted(table.available_models()) == ["llama", "qwen"]  # served names, not aliases


def test_available_models_are_served_names_with_a_routable_replica() -> None:
    table = table_of(record("a", "llama"), record("b", "qwen"), record("c", "qwen"), fallbacks={"retired": ["llama"]})
    table.replicas["a"].healthy = False
    table.replicas["b"].state = "draining"
    assert table.available_models() == ["qwen"]
    table.replicas["c"].removed = True
    assert table.available_models() == []


def test_api_keys_are_found_by_their_hash_and_replaced_on_each_rebuild() -> None:
    table = RoutingTable(1.0)
    one, two = api_key("k1", "secret-one"), api_key("k2", "secret-two")
    table.sync([], {}, [one, two])
    assert table.keys_by_hash[hash_key("secret-one")] is one and table.keys_by_hash[hash_key("secret-two")] is two
    table.sync([], {}, [two])
    assert hash_key("secret-one") not in table.keys_by_hash


def test_fallback_chains_keep_their_order_and_aliases_use_their_models_list() -> None:
    table = table_of(
        record("a", "big"),
        record("b", "small"),
        record("c", "tiny"),
        aliases={"assistant": "big", "helper": "big"},
        fallbacks={"big": ["small", "tiny"], "helper": ["tiny"], "small": []},
    )
    assert table.fallback_chain("big") == ("small", "tiny")
    assert table.fallback_chain("assistant") == ("small", "tiny")  # no list of its own
    assert table.fallback_chain("helper") == ("tiny",)  # its own list wins
    assert table.fallback_chain("small") == ()  # an empty list is no fallback
    assert table.fallback_chain("unknown") == ()


def test_a_name_with_fallbacks_but_no_replica_stays_routable_through_them() -> None:
    table = table_of(record("b", "small"), fallbacks={"retired": ["small"], "empty": []})
    assert table.models["retired"] == [] and table.canonical["retired"] == "retired"
    assert table.fallback_chain("retired") == ("small",)
    assert table.pick(table.models["retired"], (), {"model": "retired", "prompt": "p"}) is None
    assert "empty" not in table.models
    assert table.available_models() == ["small"]
    # a rebuild without the list forgets the name
    table.sync([record("b", "small")], {}, [], None)
    assert "retired" not in table.models and table.fallback_chain("retired") == ()


@pytest.mark.parametrize("ratio", [1.0, 1.25])
def test_affinity_and_least_in_flight_agree_when_every_replica_is_idle_but_one_past_the_bound(ratio: float) -> None:
    # three replicas, the affinity target far past the bound: the request goes to the idlest other
    table = table_of(record("a"), record("b"), record("c"), load_ratio=ratio)
    replicas = table.models["m"]
    payload, target = prompt_away_from_first(table, replicas)
    target.count.add(50)
    others = [r for r in replicas if r is not target]
    others[0].count.add(2)
    assert table.pick(replicas, (), payload) is others[1]
