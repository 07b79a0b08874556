"""The Prefect UI of a finished deploy run, in headless Chromium (Debian's `chromium`).

A deploy of the SmolLM2 GGUF spec runs against a real Prefect server. Chromium, driven over
its DevTools protocol, opens the run's page, clicks its Artifacts tab and waits until the
artifacts are listed; then the page of the benchmark table. The screenshots are kept in
`out/ui/` (the test's output: look at them); the test checks the rendered text of each page,
so a blank or error page fails it.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cortex.runtime import get_runtime
from test_serve import PrefectServer, client, prefect_server, run_artifacts, smollm2_spec, stop_process, write_spec  # noqa: F401

OUT = Path(__file__).resolve().parent.parent / "out" / "ui"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1440,1600",
]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Debian's chromium is not installed: `apt-get update && apt-get install -y chromium`", pytrace=False
        )
    return path


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (a websocket)."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"chromium did not open its DevTools port (exit code {self.process.poll()})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=30)
        self._id = 0

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for_text(self, *texts: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            body = self.js("document.body ? document.body.innerText : ''") or ""
            if all(t in body for t in texts):
                return body
            time.sleep(0.5)
        pytest.fail(f"the page never showed {texts}; it shows:\n{body[-3000:]}")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, label: str) -> None:
        """Click the innermost element whose text is `label` (tabs are nested spans in buttons)."""
        clicked = self.js(
            "(() => { const all = [...document.querySelectorAll('body *')]"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(label)});"
            " const el = all[all.length - 1]; if (!el) return false;"
            " (el.closest('button, [role=tab], a') || el).click(); return true; })()"
        )
        assert clicked, f"no {label!r} on the page"

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()
        stop_process(self.process)


def test_a_finished_deploy_run_shows_its_artifacts_in_the_ui(
    prefect_server: PrefectServer,  # noqa: F811 (the fixture imported from test_serve)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    test_model,
    toolchain,
) -> None:
    from flows.reconcile import apply_spec

    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "cortex-home"))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")
    spec = tmp_path / "smollm2.yaml"
    write_spec(spec, smollm2_spec(test_model.gguf))
    state = apply_spec(str(spec), return_state=True)
    try:
        assert state.is_completed(), state.message
    finally:
        runtime = get_runtime("process")
        for replica in runtime.list():
            runtime.stop(replica)
    run_id = state.state_details.flow_run_id
    artifacts = {a.key: a for a in run_artifacts(run_id) if a.key}
    assert {"applied-spec", "plan-smollm2-served", "bench-smollm2-served", "bench-smollm2-served-summary"} <= set(
        artifacts
    ), sorted(artifacts)

    OUT.mkdir(parents=True, exist_ok=True)
    browser = Browser(tmp_path / "chromium")
    try:
        browser.call("Page.enable")
        browser.open(f"{prefect_server.ui_url}/runs/flow-run/{run_id}")
        browser.wait_for_text("apply-spec", "Completed", "Artifacts")
        browser.click("Artifacts")
        browser.wait_for_text("applied-spec", "bench-smollm2-served-summary", "plan-smollm2-served")
        time.sleep(2)  # the artifact cards finish rendering
        browser.screenshot(OUT / "deploy-run-artifacts.png")

        table = artifacts["bench-smollm2-served"]
        browser.open(f"{prefect_server.ui_url}/artifacts/artifact/{table.id}")
        browser.wait_for_text("bench-smollm2-served", "concurrency")
        time.sleep(2)
        browser.screenshot(OUT / "benchmark-table.png")
    finally:
        browser.close()
