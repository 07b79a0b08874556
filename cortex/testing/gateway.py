"""Run a real gateway process for tests and benchmarks (the same code path as `cortex gateway`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..gateway.client import GatewayClient
from ..net import free_port
from ..settings import Settings


class GatewayProcess:
    """`python -m cortex.gateway` on a free port with its state under `home`."""

    def __init__(
        self,
        home: str | os.PathLike,
        port: int | None = None,
        no_auth: bool = False,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        command: list[str] | None = None,
    ) -> None:
        # Default: the module behind `cortex gateway`; tests of the CLI pass ["cortex", "gateway"].
        self.command = command or [sys.executable, "-m", "cortex.gateway"]
        self.home = Path(home)
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "CORTEX_HOME": str(self.home),
            "CORTEX_GATEWAY_PORT": str(self.port),
            "CORTEX_GATEWAY_URL": self.url,
            "CORTEX_GATEWAY_NO_AUTH": "true" if no_auth else "false",
            **(env or {}),
        }
        self.log_path = Path(log_path) if log_path else self.home / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def settings(self) -> Settings:
        return Settings.load(env=self.env)

    def start(self, timeout: float = 120.0) -> "GatewayProcess":
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.proc.returncode}; log: {self.log_path}:\n"
                    + self.log_path.read_text()[-3000:]
                )
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError as exc:
                last = exc  # not listening yet: asked again until the deadline
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not answer /health within {timeout} s (last: {last!r}); log: {self.log_path}")

    def client(self) -> GatewayClient:
        return GatewayClient(self.settings)

    def admin_token(self) -> str:
        return self.settings.resolve_admin_token()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_bytes(self) -> int:
        if self.proc is None:
            raise RuntimeError("the gateway was not started")
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text()


class Gateways:
    """Starts gateway processes for one test and stops them all after it: `start(**env)` gives a
    running GatewayProcess with `defaults` under `env`. Homes: `root/home` for every start unless
    `home=` is given (a restart keeps its registry), or `root/home<N>` per start with
    `own_homes=True` (gateways side by side)."""

    def __init__(self, root: Path, defaults: dict[str, str] | None = None, own_homes: bool = False) -> None:
        self.root = root
        self.defaults = defaults or {}
        self.own_homes = own_homes
        self.started: list[GatewayProcess] = []

    def __call__(self, home: Path | None = None, no_auth: bool = False, **env: str) -> GatewayProcess:
        if home is None:
            home = self.root / (f"home{len(self.started)}" if self.own_homes else "home")
        gateway = GatewayProcess(home, no_auth=no_auth, env={**self.defaults, **env}).start()
        self.started.append(gateway)
        return gateway

    def stop_all(self) -> None:
        for gateway in self.started:
            gateway.stop()
