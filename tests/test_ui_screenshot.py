"""The Prefect UI of a finished deploy run, in headless Chromium (Debian's `chromium`).

A deploy of the SmolLM2 GGUF spec runs against a real Prefect server; Chromium opens the run's
page on its Artifacts tab, and the page of the benchmark table, and the screenshots are kept in
`out/ui/` (the test's output: look at them). The test checks the pages through Chromium's own
DOM dump, so a blank or error page fails it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cortex.runtime import get_runtime
from test_serve import PrefectServer, client, prefect_server, run_artifacts, smollm2_spec, write_spec  # noqa: F401

OUT = Path(__file__).resolve().parent.parent / "out" / "ui"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--hide-scrollbars", "--window-size=1440,1600", "--virtual-time-budget=20000",
]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed: `apt-get update && apt-get install -y chromium`", pytrace=False)
    return path


def browse(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """Chromium's DOM after the page's scripts ran (and a screenshot, if asked)."""
    args = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if screenshot is not None:
        done = subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=180)
        assert screenshot.is_file() and screenshot.stat().st_size > 10_000, done.stderr[-2000:]
    done = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_finished_deploy_run_shows_its_artifacts_in_the_ui(
    prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_model, toolchain
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
    assert "applied-spec" in artifacts and "benchmark-smollm2-served" in artifacts, sorted(artifacts)

    OUT.mkdir(parents=True, exist_ok=True)
    run_page = f"{prefect_server.ui_url}/runs/flow-run/{run_id}?tab=Artifacts"
    dom = browse(run_page, tmp_path / "chromium", screenshot=OUT / "deploy-run-artifacts.png")
    assert "apply-spec" in dom and "applied-spec" in dom and "benchmark-smollm2-served" in dom, dom[-3000:]

    table = artifacts["benchmark-smollm2-served"]
    dom = browse(f"{prefect_server.ui_url}/artifacts/artifact/{table.id}", tmp_path / "chromium",
                 screenshot=OUT / "benchmark-table.png")
    assert "concurrency" in dom.lower(), dom[-3000:]
