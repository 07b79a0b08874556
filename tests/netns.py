"""Several "hosts" on one machine: Linux network namespaces on a bridge.

    with simulated_hosts(3) as hosts:      # cx<id>-h1..h3 at 10.77.N.11..13, bridge cxbrN 10.77.N.1/24
        hosts[0].popen([...])               # a process inside the first host's namespace

N is the first subnet whose bridge does not exist yet, so two test sessions on one machine get
two bridges and two subnets instead of breaking each other's. The root side of the bridge is
`hosts[i].root_address` (10.77.N.1): servers there (Prefect, the gateway) that listen on it or on
0.0.0.0 are reachable from every host, and every host's address from the root side.
Each namespace has its own `lo` (up) and its own veth into the bridge. Everything is removed on
exit, also when the body fails; processes started with `popen` are stopped first. Needs root
and `ip` (iproute2): without them this fails, it never skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

PREFIX = 24
SUBNETS = 100  # bridges cxbr0..cxbr99 on 10.77.0.0/24..10.77.99.0/24


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class SimHost:
    name: str  # the host's fleet name: h1, h2, ...
    namespace: str
    address: str
    root_address: str  # the bridge's address in the root namespace
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` in this host's namespace, in its own session (stopped on teardown)."""
        proc = subprocess.Popen(self.command(argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def kill_all(self) -> list[int]:
        """SIGKILL every process in the namespace (a host losing power): its pids, as killed."""
        done = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True, check=True)
        pids = [int(p) for p in done.stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def set_link(self, up: bool) -> None:
        """Bring the host's link to the bridge down (unplugged) or up again."""
        done = subprocess.run(
            ["ip", "-n", self.namespace, "-o", "link", "show"], capture_output=True, text=True, check=True
        )
        for line in done.stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name != "lo":
                _ip("-n", self.namespace, "link", "set", name, "up" if up else "down")
                if up:  # the default route goes with the link: put it back
                    subprocess.run(
                        ["ip", "-n", self.namespace, "route", "replace", "default", "via", self.root_address]
                    )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _require_ip() -> None:
    if shutil.which("ip") is None:
        pytest.fail("`ip` (iproute2) is missing: install it (scripts/apt-install ip=iproute2, as ./dev does)")
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root; run these tests as root")


def _claim_bridge() -> int:
    """Create the first free bridge cxbrN and return N: creating it is the claim, so two sessions
    starting at once cannot pick the same subnet."""
    for subnet in range(SUBNETS):
        done = subprocess.run(["ip", "link", "add", f"cxbr{subnet}", "type", "bridge"], capture_output=True, text=True)
        if done.returncode == 0:
            return subnet
        if "exists" not in done.stderr:
            raise RuntimeError(f"ip link add cxbr{subnet} type bridge: {done.stderr.strip()}")
    raise RuntimeError(f"no free test bridge: cxbr0..cxbr{SUBNETS - 1} all exist (left by killed sessions? `ip link`)")


@contextlib.contextmanager
def simulated_hosts(count: int = 3) -> Iterator[list[SimHost]]:
    _require_ip()
    subnet = _claim_bridge()
    tag = f"cx{os.getpid() % 100000}s{subnet}"  # unique per test process and bridge: names stay under 15 characters
    bridge, root_address = f"cxbr{subnet}", f"10.77.{subnet}.1"
    hosts = [SimHost(f"h{i}", f"{tag}-h{i}", f"10.77.{subnet}.{10 + i}", root_address) for i in range(1, count + 1)]
    veths: list[str] = []
    namespaces: list[str] = []
    try:
        _ip("addr", "add", f"{root_address}/{PREFIX}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, host in enumerate(hosts, 1):
            root_end, host_end = f"{tag}v{i}", f"{tag}p{i}"
            _ip("netns", "add", host.namespace)
            namespaces.append(host.namespace)
            _ip("link", "add", root_end, "type", "veth", "peer", "name", host_end)
            veths.append(root_end)
            _ip("link", "set", root_end, "master", bridge)
            _ip("link", "set", root_end, "up")
            _ip("link", "set", host_end, "netns", host.namespace)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/{PREFIX}", "dev", host_end)
            _ip("-n", host.namespace, "link", "set", host_end, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "route", "add", "default", "via", root_address)
        yield hosts
    finally:
        for host in hosts:
            host.stop()
        errors = []
        for namespace in namespaces:  # its end of the veth pair goes with it, and so the pair
            try:
                _ip("netns", "delete", namespace)
            except RuntimeError as e:
                errors.append(str(e))
        for veth in veths:
            with contextlib.suppress(RuntimeError):
                _ip("link", "delete", veth)  # already gone with its peer, unless the netns was not
        try:
            _ip("link", "delete", bridge)
        except RuntimeError as e:
            errors.append(str(e))
        if errors:
            raise RuntimeError("network namespace teardown: " + "; ".join(errors))
