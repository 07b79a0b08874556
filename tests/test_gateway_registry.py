"""The registry's contract on both backends (a SQLite file, a PostgreSQL database on a real,
throwaway PostgreSQL cluster), and two real gateway processes sharing one PostgreSQL registry
the way two gateways on two hosts behind a load balancer do."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time

import httpx
import pytest

from cortex.gateway.registry import (
    Conflict,
    NotFound,
    PostgresRegistry,
    RegistryUnavailable,
    open_registry,
    redact_url,
)
from cortex.gateway.client import GatewayError
from cortex.gateway.limits import KeyLimits
from cortex.net import free_port
from cortex.settings import Settings, SettingsError
from cortex.testing.fake_engine import FakeEngine
from cortex.testing.gateway import GatewayProcess
from pg_cluster import PostgresCluster, PostgresMissing

FAST = {
    "CORTEX_GATEWAY_HEALTH_INTERVAL": "0.3",
    "CORTEX_GATEWAY_HEALTH_TIMEOUT": "30",
    "CORTEX_GATEWAY_CONNECT_TIMEOUT": "30",
}


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    # A hang guard only: it polls, so a passing run takes no longer than the gateways need.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def chat(gw: GatewayProcess, key: str, model: str = "smol") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(
        gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60
    )


# --- the registry contract, on SQLite and on PostgreSQL ---------------------------------------------


def test_replicas_aliases_fallbacks_and_changes_seen_by_another_connection(registry_location):
    one, two = open_registry(registry_location), open_registry(registry_location)
    seen = two.data_version()
    rep = one.register(
        "smol", "http://10.0.0.1:8000/", "engine-key", ["tiny"], labels={"gpu": "h100"}, fallbacks=["big"]
    )
    assert two.data_version() != seen  # what makes a gateway rebuild its routing table
    seen = two.data_version()
    assert two.data_version() == seen  # and nothing else does
    assert two.replica(rep.id) == rep and rep.url == "http://10.0.0.1:8000" and rep.labels == {"gpu": "h100"}
    assert two.aliases() == {"tiny": "smol"} and two.fallbacks() == {"smol": ["big"]}
    # registering the same model and url again updates that replica
    again = two.register("smol", "http://10.0.0.1:8000", "other-key", ["tiny"])
    assert again.id == rep.id and one.replica(rep.id).engine_api_key == "other-key"
    assert one.replica(rep.id).created_at == rep.created_at  # full precision on both backends
    with pytest.raises(Conflict):
        one.register("beta", "http://10.0.0.2:8000", aliases=["tiny"])
    with pytest.raises(Conflict):
        one.register("tiny", "http://10.0.0.2:8000")
    with pytest.raises(Conflict):
        one.register("smol", "http://10.0.0.1:8000", replica_id="another")
    second = one.register("smol", "http://10.0.0.3:8000")
    assert [r.id for r in two.replicas()] == [rep.id, second.id]
    assert two.drain(second.id).state == "draining"
    two.deregister(rep.id)
    assert one.aliases() == {"tiny": "smol"}  # the model still has a replica
    one.deregister(second.id)
    assert two.replicas() == [] and two.aliases() == {} and two.fallbacks() == {"smol": ["big"]}
    with pytest.raises(NotFound):
        two.deregister(rep.id)
    with pytest.raises(NotFound):
        two.drain(rep.id)
    assert one.set_fallbacks("smol", []) == [] and two.fallbacks() == {}
    one.close()
    two.close()


def test_keys_limits_and_usage_shared_between_connections(registry_location):
    one, two = open_registry(registry_location), open_registry(registry_location)
    expires = time.time() + 3600.123456
    key, record = one.create_key("ci", models=["smol"], expires_at=expires, limits=KeyLimits(rpm=5))
    assert [k.id for k in two.keys()] == [record.id]
    assert two.key(record.id) == record and record.expires_at == expires and record.models == ("smol",)
    assert two.set_key_limits(record.id, KeyLimits(tpm=3_000_000_000)).limits == KeyLimits(tpm=3_000_000_000)
    one.revoke_key(record.id)
    assert two.key(record.id).disabled
    with pytest.raises(NotFound):
        two.revoke_key("key-none")
    # usage and limit state: each flush adds its counts and learns the others' (limits.py)
    hour = int(time.time() // 3600)
    totals, today = one.flush_usage(hour, [(record.id, "smol", [2, 10, 5, 0, 0])], [], 0.0)
    assert (totals, today) == ({}, {})
    limit = (record.id, 3.0, None, 100.0, [2, 15], [0, 0])
    assert one.flush_usage(hour, [], [limit], hour * 3600.0) == ({record.id: (2, 15)}, {record.id: 15})
    other = (record.id, 4.0, None, 101.0, [1, 7], [0, 0])  # a second gateway that had not seen those
    assert two.flush_usage(hour, [(record.id, "smol", [1, 4, 3, 0, 1])], [other], hour * 3600.0) == (
        {record.id: (3, 22)},
        {record.id: 22},
    )
    assert two.limit_states([record.id]) == {record.id: (4.0 - 2, None, 101.0, 3, 22)}
    assert one.usage() == [(record.id, "smol", 3, 14, 8, 0, 1)]
    assert one.tokens_since(hour * 3600.0, [record.id]) == {record.id: 22}
    assert one.usage(since=(hour + 1) * 3600.0) == []


# --- PostgreSQL specifics --------------------------------------------------------------------------


def test_a_postgres_url_in_settings_and_its_password_never_shown():
    s = Settings.load(env={"CORTEX_HOME": "/tmp/h", "CORTEX_GATEWAY_DB": "postgresql://cortex@db:5432/cortex"})
    assert s.gateway_db == "postgresql://cortex@db:5432/cortex"
    with pytest.raises(SettingsError) as err:
        Settings.load(env={"CORTEX_HOME": "/tmp/h", "CORTEX_GATEWAY_DB": "mysql://db/cortex"})
    assert "CORTEX_GATEWAY_DB" in str(err.value) and "postgresql://" in str(err.value)
    assert redact_url("postgresql://cortex:s3cret@db:5432/cortex") == "postgresql://cortex:***@db:5432/cortex"
    assert redact_url("postgresql://db/cortex?sslmode=require&password=s3cret") == (
        "postgresql://db/cortex?sslmode=require&password=***"
    )
    assert redact_url("/var/lib/cortex/registry.db") == "/var/lib/cortex/registry.db"
    # nothing listens on this port: a clear 503-class error that names the database, not the password
    url = f"postgresql://cortex:s3cret@127.0.0.1:{free_port()}/cortex"
    with pytest.raises(RegistryUnavailable) as down:
        PostgresRegistry(url, connect_timeout=5)
    assert down.value.status == 503 and "s3cret" not in str(down.value) and "127.0.0.1" in str(down.value)


def test_a_postgres_registry_reconnects_after_the_connection_is_cut(pg_url):
    registry = open_registry(pg_url)
    registry.register("smol", "http://10.0.0.1:8000")
    admin = open_registry(pg_url)
    with admin._connected() as conn:  # what a database restart or failover does to a gateway's session
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'cortex-gateway'"
            " AND pid <> pg_backend_pid()"
        )
    with pytest.raises(RegistryUnavailable):
        registry.replicas()
    assert [r.model for r in registry.replicas()] == ["smol"]  # the next call opens a new connection


# --- two gateways on one PostgreSQL registry ---------------------------------------------------------


def test_two_gateways_on_one_postgres_registry_serve_the_same_routes_and_keys(pg_url, tmp_path):
    token = "cortex-admin-" + secrets.token_urlsafe(16)  # both gateways get the same admin token
    env = {**FAST, "CORTEX_GATEWAY_DB": pg_url, "CORTEX_ADMIN_TOKEN": token}
    # A's URL carries a password (the test cluster trusts loopback, so any works): never in its log
    with_password = pg_url.replace("postgresql://cortex@", "postgresql://cortex:s3cret@")
    engine = FakeEngine(api_key="engine-secret", models=("smol",)).start()
    cli = [sys.executable, "-m", "cli"]
    a = GatewayProcess(tmp_path / "host-a", env={**env, "CORTEX_GATEWAY_DB": with_password}, command=[*cli, "gateway"])
    b = GatewayProcess(tmp_path / "host-b", env=env)
    try:
        a.start()
        b.start()

        with a.client() as admin_a:
            key = admin_a.create_key(name="shared")["key"]
            rep = admin_a.register("smol", engine.base_url, engine_api_key="engine-secret", aliases=["tiny"])
        assert chat(a, key).status_code == 200
        # B picks up A's key and replica from the registry (its maintenance loop sees the version change)
        wait_until(lambda: chat(b, key).status_code == 200, what="gateway B to route A's replica with A's key")
        for gw in (a, b):
            r = chat(gw, key, "tiny")
            assert r.status_code == 200 and r.headers["x-cortex-replica"] == rep["id"]
            assert chat(gw, "sk-cortex-unknown").status_code == 401
        # deregistered through B: gone from A's routing table too
        with b.client() as admin_b:
            admin_b.deregister(rep["id"])
            assert admin_b.list()["replicas"] == []
        wait_until(lambda: chat(a, key).status_code == 404, what="gateway A to drop the replica B deregistered")
        assert chat(a, key, "tiny").status_code == 404
        models = httpx.get(a.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        assert models == []
        # a key revoked through B stops working on A
        with b.client() as admin_b:
            admin_b.revoke_key(admin_b.list_keys()[0]["id"])
        wait_until(lambda: chat(a, key).status_code == 401, what="gateway A to refuse the key revoked through B")
        assert "registry postgresql://cortex:***@127.0.0.1" in a.log() and "s3cret" not in a.log()
        out = subprocess.run([*cli, "gateway", "settings"], env=a.env, capture_output=True, text=True, check=True)
        assert "gateway_db = postgresql://cortex:***@" in out.stdout and "s3cret" not in out.stdout
    finally:
        a.stop()
        b.stop()
        engine.stop()


@pytest.mark.parts
def test_a_gateway_keeps_routing_through_a_postgres_outage_and_writes_the_usage_afterwards(tmp_path):
    try:
        cluster = PostgresCluster()  # its own cluster: this test stops it
    except PostgresMissing as missing:
        pytest.fail(str(missing), pytrace=False)
    engine = FakeEngine(api_key="engine-secret", models=("smol",)).start()
    env = {**FAST, "CORTEX_GATEWAY_DB": cluster.url(), "CORTEX_GATEWAY_USAGE_FLUSH_INTERVAL": "0.2"}
    gw = GatewayProcess(tmp_path / "home", env=env)
    try:
        cluster.start()
        gw.start()
        with gw.client() as admin:
            admin.register("smol", engine.base_url, engine_api_key="engine-secret")
            routed = admin.create_key(name="before")["key"]
            key = admin.create_key(name="during the outage")  # used only while the database is down
        wait_until(lambda: chat(gw, routed).status_code == 200, what="the replica to be routable")
        reader = open_registry(cluster.url())

        def requests_recorded() -> int:
            try:
                return sum(row[2] for row in reader.usage() if row[0] == key["id"])
            except RegistryUnavailable:  # the first call after the restart: the next one reconnects
                return -1

        cluster.halt()
        for _ in range(3):  # the request path never reads the database
            assert chat(gw, key["key"]).status_code == 200
        with gw.client() as admin, pytest.raises(GatewayError) as down:
            admin.list()
        assert down.value.status == 503 and "unavailable" in str(down.value)
        with gw.client() as admin, pytest.raises(GatewayError) as down:
            admin.usage()  # its flush took those requests' counts and failed: they must not be lost
        assert down.value.status == 503
        # the maintenance loop's reads and flushes fail too, and say so (once, checked below)
        for failed in ("reading the registry postgresql://", "writing usage to the registry postgresql://"):
            wait_until(lambda failed=failed: failed in gw.log(), what=f"'{failed}' in the log")
        cluster.start()  # back on the same port: the gateway reconnects and writes what it kept
        wait_until(
            lambda: requests_recorded() == 3,
            what="the usage counted during the outage to reach the registry",
        )
        reader.close()
        with gw.client() as admin:
            assert [r["model"] for r in admin.list()["replicas"]] == ["smol"]
        # The outage is in the log once, without a traceback (the maintenance loop tried every
        # 0.5 s and every flush), and so is the end of it.
        for back in ("back (reading it works again)", "back (writing usage to it works again)"):
            wait_until(lambda back=back: back in gw.log(), what=f"'{back}' in the log")
        log = gw.log()
        assert log.count("reading the registry postgresql://") == 1, log
        assert log.count("writing usage to the registry postgresql://") == 1, log
        assert "Traceback" not in log, log
    finally:
        gw.stop()
        engine.stop()
        cluster.stop()


def test_a_registry_outage_is_logged_once_with_a_reminder_a_minute_and_once_when_back(caplog) -> None:
    from cortex.gateway.app import OUTAGE_REMINDER_S, RegistryOutage
    from cortex.gateway.registry import RegistryUnavailable

    now = [1000.0]
    outage = RegistryOutage("postgresql://cortex:***@db/cortex", "reading", clock=lambda: now[0])
    down = RegistryUnavailable("the registry database is unavailable: connection refused")
    with caplog.at_level("INFO", logger="cortex.gateway"):
        for _ in range(int(OUTAGE_REMINDER_S / 0.5) - 1):  # a minute of tries, 0.5 s apart
            outage.failed(down)
            now[0] += 0.5
        assert [r.getMessage()[:61] for r in caplog.records] == [
            "reading the registry postgresql://cortex:***@db/cortex failed"
        ]
        assert not caplog.records[0].exc_info and "connection refused" in caplog.records[0].getMessage()
        now[0] += 0.5
        outage.failed(down)  # a minute on: one reminder
        assert "still fails after 60 s (120 failed tries)" in caplog.records[-1].getMessage()
        outage.recovered()
        outage.recovered()  # only the first call after an outage says so
        assert [r.getMessage() for r in caplog.records[2:]] == [
            "registry postgresql://cortex:***@db/cortex back (reading it works again) after 60 s"
        ]
        outage.failed(ValueError("no such column: x"))  # not an outage: a bug, with its traceback once
        assert caplog.records[-1].exc_info
