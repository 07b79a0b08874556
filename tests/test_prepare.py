"""The prepare-model flow end to end: `cortex prepare SPEC --json` in its own process, against a
real Prefect API (prefect_test_harness's temporary server), the real huggingface_hub client
talking to a local Hub endpoint (tests/hubserver.py) that serves a private repo made from the
real SmolLM2-135M-Instruct checkpoint, and the pinned llama.cpp converter and llama-quantize.

Artifacts, logs and parameters are read back through the Prefect client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from cortex.artifacts import inspect_gguf
from cache_helpers import linked_cortex_cache
from hubserver import HubRepo, HubServer, sha256_file

TOKEN = "hf_cortexPrepareSecret0123456789abcdef"
REPO = "acme/smollm2-135m-instruct"
NAME = "smollm2-prep"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def hub_repo(test_model) -> HubRepo:
    return HubRepo.from_folder(REPO, Path(test_model.hf_dir))


def _env(prefect_api: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PREFECT_"))}
    # The toolchain and test model stay where `./dev setup` put them; only the artifact cache,
    # stamps and Hub listings of this test go to a fresh CORTEX_CACHE that links to them.
    env.update(
        PREFECT_API_URL=prefect_api,
        CORTEX_CACHE=str(linked_cortex_cache(tmp)),
        HF_HUB_CACHE=str(tmp / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    env.update(extra)
    return env


def _write_spec(tmp: Path, source: dict, name: str = NAME, **more) -> Path:
    import yaml

    spec = {
        "name": name,
        "source": source,
        "engine": "auto",
        "runtime": "process",
        "resources": {"concurrency": 2, "context_length": 2048},
        **more,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class CommandLineWatch:
    """Samples every process's command line while a run is going (to prove the token is in none)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        self.seen.add(
                            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        )
                    except OSError:
                        pass
            time.sleep(0.02)

    def __enter__(self) -> "CommandLineWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _prepare(spec: Path, env: dict[str, str], check: bool = True) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "prepare", str(spec), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout[proc.stdout.index("{") :]) if "{" in proc.stdout else {}
    return out, proc


def _read(coro):
    return asyncio.run(coro)


async def _flow_runs(name: str = "prepare-model"):
    async with get_client() as client:
        runs = await client.read_flow_runs()
        return [r for r in runs if r.name and (await client.read_flow(r.flow_id)).name == name]


async def _artifacts(key: str):
    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


async def _all_artifacts_and_logs():
    async with get_client() as client:
        artifacts = await client.read_artifacts(limit=200)
        logs = await client.read_logs(limit=200)
        more = logs
        offset = 200
        while len(more) == 200:
            more = await client.read_logs(offset=offset, limit=200)
            logs += more
            offset += 200
        runs = await client.read_flow_runs()
        task_runs = await client.read_task_runs()
        return artifacts, logs, runs, task_runs


def test_prepare_hf_repo_to_verified_f16_and_q8_0_then_cached_then_offline(
    prefect_api, hub_repo, toolchain, vllm_install, tmp_path
):
    """Client paths: resolve_revision + model_info + snapshot_download(config/tokenizer) first,
    then http_get (weights, with the token), all through HF_ENDPOINT; the converter and
    llama-quantize of the pinned toolchain; Prefect artifacts and logs read back via the API.
    Second run: the cached-pointer shortcut (no GET) and the artifact cache. Third run:
    HF_HUB_OFFLINE=1 with the endpoint gone."""
    spec = _write_spec(tmp_path, {"repo": REPO}, quantization="Q8_0")
    server = HubServer([hub_repo], token=TOKEN).start()
    env = _env(prefect_api, tmp_path, HF_ENDPOINT=server.url, HF_TOKEN=TOKEN)
    try:
        with CommandLineWatch() as watch:
            first, proc1 = _prepare(spec, env)
        weights = next(f for f in hub_repo.commits[hub_repo.refs["main"]].values() if f.path.endswith(".safetensors"))
        assert first["source_revision"] == hub_repo.refs["main"]
        assert first["cached"] is False and first["engine"] == "llamacpp" and first["built"] == ["F16", "Q8_0"]
        assert first["downloaded_bytes"] >= weights.size
        assert [step["exit_code"] for step in first["build_steps"]] == [0, 0]  # the converter, llama-quantize
        ggufs = {Path(f["path"]).name.rsplit("-", 1)[-1]: f for f in first["files"]}
        assert set(ggufs) == {"F16.gguf", "Q8_0.gguf"}, first["files"]
        for quant in ("F16", "Q8_0"):
            f = ggufs[f"{quant}.gguf"]
            assert sha256_file(Path(f["path"])) == f["sha256"]
            assert Path(f["path"]).stat().st_size == f["bytes"]
            summary = inspect_gguf(Path(f["path"]))
            assert (summary.architecture, summary.file_type) == ("llama", quant)
            predicted = first["predicted_bytes"][quant]
            assert abs(f["bytes"] - predicted) / predicted < 0.02, (quant, f["bytes"], predicted)
        assert first["artifact_path"] == ggufs["Q8_0.gguf"]["path"]
        # Off a terminal (the command's stderr is a pipe) each long step is a few plain lines.
        said = [line for line in proc1.stderr.splitlines() if line.startswith("cortex: ")]
        for label, end in (
            (f"download {weights.path}", "(100%), done ("),
            ("convert ", ", done ("),
            ("quantize ", "tensors, done ("),
        ):
            lines = [line for line in said if line.startswith(f"cortex: {label}")]
            assert lines and lines[0].endswith("started (0 s)") and end in lines[-1], (label, said)
            assert len(lines) <= 13, lines  # start, tenths, a phase, end: not a line per tensor or chunk
        # Only the checkpoint's files crossed the wire, each GET carrying the token.
        got = {r.path.rsplit("/", 1)[-1] for r in server.requests if r.method == "GET" and "/resolve/" in r.path}
        assert weights.path in got and all(r.authorized for r in server.requests if REPO in r.path)

        # Prefect shows the run: files table, report, progress, and the tools' output in the logs.
        table = _read(_artifacts(f"prepare-{NAME}-files"))
        assert table and {row["sha256"] for row in json.loads(table[0].data)} == {f["sha256"] for f in first["files"]}
        report = _read(_artifacts(f"prepare-{NAME}-report"))
        assert (
            report and "## Decision" in report[0].data and "## Plan" in report[0].data and "## Facts" in report[0].data
        )
        for key in (f"prepare-{NAME}-download", f"prepare-{NAME}-build"):
            progress = _read(_artifacts(key))
            assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0, key
        artifacts, logs, runs, task_runs = _read(_all_artifacts_and_logs())
        messages = "\n".join(log.message for log in logs)
        assert "llama-quantize" in messages and "convert_hf_to_gguf.py" in messages
        assert "Model successfully exported" in messages or "model size" in messages  # tool output, streamed

        # Second run: nothing downloaded, nothing built: no file GET, no tool run, no file rewritten.
        gets_before = sum(1 for r in server.requests if r.method == "GET" and "/resolve/" in r.path)
        mtimes = {name: Path(f["path"]).stat().st_mtime_ns for name, f in ggufs.items()}
        second, proc2 = _prepare(spec, env)
        assert second["cached"] is True and second["downloaded_bytes"] == 0 and second["built"] == []
        assert second["resumed_bytes"] == 0 and second["build_steps"] == []
        assert second["files"] == [ggufs["Q8_0.gguf"]]
        assert sum(1 for r in server.requests if r.method == "GET" and "/resolve/" in r.path) == gets_before
        assert {name: Path(f["path"]).stat().st_mtime_ns for name, f in ggufs.items()} == mtimes
        runs = sorted(_read(_flow_runs()), key=lambda r: r.start_time)
        assert runs[-1].state.is_completed()
    finally:
        server.stop()

    # Third run: offline, the endpoint gone, a warm cache.
    offline_env = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    third, _ = _prepare(spec, offline_env)
    assert third["cached"] is True and third["source_revision"] == first["source_revision"]

    # The token is nowhere: logs, parameters, artifacts, task inputs, outputs, files, command lines.
    artifacts, logs, runs, task_runs = _read(_all_artifacts_and_logs())
    haystacks = {
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(f"{a.data}{a.description}" for a in artifacts),
        "flow parameters": json.dumps([r.parameters for r in runs], default=str),
        "task runs": json.dumps([t.model_dump(mode="json") for t in task_runs], default=str),
        "flow runs": json.dumps([r.model_dump(mode="json") for r in runs], default=str),
        "command lines": "\n".join(watch.seen),
        "cli output": proc1.stdout + proc1.stderr + proc2.stdout + proc2.stderr,
    }
    assert any("convert_hf_to_gguf.py" in c for c in watch.seen), "the watch missed the converter"
    for where, text in haystacks.items():
        assert TOKEN not in text, f"the token leaked into {where}"
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            assert TOKEN.encode() not in path.read_bytes(), f"the token was written to {path}"


def test_prepare_gguf_file_uses_it_as_is(prefect_api, test_model, tmp_path):
    """No Hub: a local GGUF file is checked with the gguf reader and its sha256 is the source revision."""
    spec = _write_spec(tmp_path, {"gguf": str(test_model.gguf)}, name="smollm2-gguf-prep")
    out, _ = _prepare(spec, _env(prefect_api, tmp_path))
    assert out["engine"] == "llamacpp" and out["format"] == "gguf" and out["built"] == []
    assert out["source_revision"] == sha256_file(Path(test_model.gguf))
    assert out["files"] == [
        {"path": str(test_model.gguf), "bytes": Path(test_model.gguf).stat().st_size, "sha256": out["source_revision"]}
    ]
    assert _read(_artifacts("prepare-smollm2-gguf-prep-files"))


def test_prepare_gguf_repo_fetches_only_that_file(prefect_api, test_model, tmp_path):
    """Client paths: resolve_revision, model_info, then http_get for the one GGUF named in the spec
    (another GGUF and the README in the repo stay on the server)."""
    folder = tmp_path / "ggufrepo"
    folder.mkdir()
    os.symlink(test_model.gguf, folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
    (folder / "SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 1000)
    (folder / "README.md").write_text("two quants\n")
    repo = HubRepo.from_folder("acme/smollm2-gguf", folder)
    spec = _write_spec(
        tmp_path, {"repo": "acme/smollm2-gguf", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"}, name="smollm2-ggufrepo-prep"
    )
    with HubServer([repo]) as server:
        out, _ = _prepare(spec, _env(prefect_api, tmp_path, HF_ENDPOINT=server.url))
        assert server.gets_of("SmolLM2-135M-Instruct.Q8_0.gguf") == [] and server.gets_of("README.md") == []
    assert out["source_revision"] == repo.refs["main"] and out["format"] == "gguf"
    assert [f["sha256"] for f in out["files"]] == [sha256_file(Path(test_model.gguf))]


def test_an_architecture_the_converter_does_not_know_fails_before_the_download(prefect_api, test_model, tmp_path):
    """Client paths: resolve_revision, model_info and snapshot_download of config.json/tokenizer
    only; the converter table says no, so the weights are never requested."""
    folder = tmp_path / "oddrepo"
    folder.mkdir()
    for src in Path(test_model.hf_dir).iterdir():
        if src.is_file() and not src.name.startswith("."):
            os.symlink(src, folder / src.name)
    config = json.loads((Path(test_model.hf_dir) / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["CortexNovelForCausalLM"]}))
    spec = _write_spec(tmp_path, {"repo": "acme/novel"}, name="novel-prep", engine="llamacpp")
    with HubServer([HubRepo.from_folder("acme/novel", folder)]) as server:
        out, proc = _prepare(spec, _env(prefect_api, tmp_path, HF_ENDPOINT=server.url), check=False)
        assert proc.returncode != 0
        assert "UnsupportedArchitecture" in proc.stderr and "CortexNovelForCausalLM" in proc.stderr
        assert not [r for r in server.requests if r.method == "GET" and r.path.endswith(".safetensors")]


def test_offline_with_a_cold_cache_says_so(prefect_api, tmp_path):
    """Client path: HfApi.resolve_revision(local_files_only=True) with nothing cached."""
    spec = _write_spec(tmp_path, {"repo": REPO}, name="cold-prep")
    out, proc = _prepare(
        spec, _env(prefect_api, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"), check=False
    )
    assert proc.returncode != 0
    assert "OfflineCacheMiss" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr, proc.stderr[-2000:]


def test_prepare_for_vllm_is_the_verified_snapshot_with_the_token_from_a_secret_block(prefect_api, hub_repo, tmp_path):
    """Client paths: resolve_revision, model_info, http_get for the safetensors, snapshot_download
    for the rest; no conversion. The token comes from a Prefect Secret block (no HF_TOKEN).
    The files table carries the Hub's sha256 for the weights."""
    from prefect.blocks.system import Secret

    secret = "hf_fromSecretBlock" + os.urandom(12).hex()
    Secret(value=secret).save("cortex-test-hf-token", overwrite=True)
    spec = _write_spec(tmp_path, {"repo": REPO}, name="smollm2-vllm-prep", engine="vllm")
    with HubServer([hub_repo], token=secret) as server:
        out, proc = _prepare(
            spec, _env(prefect_api, tmp_path, HF_ENDPOINT=server.url, CORTEX_HF_TOKEN_BLOCK="cortex-test-hf-token")
        )
        assert all(r.authorized for r in server.requests if REPO in r.path)
    _, logs, runs, _ = _read(_all_artifacts_and_logs())
    assert secret not in "\n".join(log.message for log in logs) + json.dumps([r.parameters for r in runs])
    assert secret not in proc.stdout + proc.stderr
    assert out["engine"] == "vllm" and out["format"] == "hf" and out["built"] == []
    commit = hub_repo.refs["main"]
    assert out["artifact_path"].endswith(f"snapshots/{commit}") and out["source_revision"] == commit
    assert Path(out["mount_root"]).name == "models--acme--smollm2-135m-instruct"
    served = hub_repo.commits[commit]
    by_name = {Path(f["path"]).name: f for f in out["files"]}
    assert "model.safetensors" in by_name and "config.json" in by_name
    assert by_name["model.safetensors"]["sha256"] == served["model.safetensors"].sha256
    for f in out["files"]:
        assert sha256_file(Path(f["path"])) == f["sha256"] and Path(f["path"]).stat().st_size == f["bytes"]


def test_network_failures_are_retried_and_a_missing_revision_is_not(prefect_api, hub_repo, tmp_path):
    """Client path: HfApi.resolve_revision meeting a 503 (HubUnreachable: the task retries) and
    a 404 RevisionNotFound (HubError: no retry, a message naming the revision)."""
    spec = _write_spec(tmp_path, {"repo": REPO}, name="retry-prep", engine="vllm")
    with HubServer([hub_repo]) as server:
        env = _env(prefect_api, tmp_path, HF_ENDPOINT=server.url)
        server.fail_next(1, 503)
        out, proc = _prepare(spec, env)
        assert out["source_revision"] == hub_repo.refs["main"]
        bad = _write_spec(tmp_path, {"repo": REPO, "revision": "no-such-branch"}, name="norev-prep", engine="vllm")
        _, failed = _prepare(bad, env, check=False)
    assert failed.returncode != 0 and "no-such-branch" in failed.stderr
    by_spec = _read(_resolve_runs_by_spec())
    assert by_spec[str(spec)] == 2  # the 503 cost one retry
    assert by_spec[str(bad)] == 1  # a missing revision is not retried


async def _resolve_runs_by_spec() -> dict[str, int]:
    async with get_client() as client:
        out = {}
        for t in await client.read_task_runs():
            if t.name.startswith("resolve-source"):
                run = await client.read_flow_run(t.flow_run_id)
                out[run.parameters["spec_path"]] = t.run_count
        return out


def test_no_room_for_download_plus_conversion_fails_before_the_download(prefect_api, hub_repo, tmp_path):
    """Client paths: resolve_revision, model_info and the small files only. Caches on a real
    450 MB tmpfs: the 270 MB download fits, the download plus the F16 and Q8_0 files do not."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=450M", "tmpfs", str(mount)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"this test needs a tmpfs mount (root or CAP_SYS_ADMIN): {result.stderr}"
    try:
        spec = _write_spec(tmp_path, {"repo": REPO}, name="full-prep", quantization="Q8_0")
        with HubServer([hub_repo]) as server:
            _, proc = _prepare(spec, _env(prefect_api, mount, HF_ENDPOINT=server.url), check=False)
            assert not [r for r in server.requests if r.method == "GET" and r.path.endswith(".safetensors")]
        assert proc.returncode != 0 and "NotEnoughSpace" in proc.stderr, proc.stderr[-3000:]
        assert "F16 GGUF" in proc.stderr and "the download" in proc.stderr and str(mount) in proc.stderr
        assert not list((mount / "cortex").glob("artifacts/*"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_killed_prepare_resumes_its_download(prefect_api, hub_repo, tmp_path):
    """Client path: http_get with `Range: bytes=N-` in the download-weights task of a second
    `cortex prepare`, after the first one was SIGKILLed (with its whole process group) mid-file."""
    spec = _write_spec(tmp_path, {"repo": REPO}, name="resume-prep", engine="vllm")
    size = next(f.size for f in hub_repo.commits[hub_repo.refs["main"]].values() if f.path == "model.safetensors")
    with HubServer([hub_repo], throttle_bytes_per_s=30_000_000) as server:
        env = _env(prefect_api, tmp_path, HF_ENDPOINT=server.url)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "prepare", str(spec), "--json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        kept = 0
        while time.monotonic() < deadline and kept < size // 4:
            partial = list((tmp_path / "hf").glob("models--*/blobs/*.cortex-partial"))
            kept = partial[0].stat().st_size if partial else 0
            time.sleep(0.05)
        os.killpg(proc.pid, 9)
        proc.wait()
        kept = partial[0].stat().st_size
        assert size // 4 <= kept < size, "the kill should land mid-file"
        server.throttle_bytes_per_s = None
        out, _ = _prepare(spec, env)
        gets = server.gets_of("model.safetensors")
    assert [g.range for g in gets] == [None, f"bytes={kept}-"]
    assert out["resumed_bytes"] == kept and out["cached"] is False
    weights = next(f for f in out["files"] if f["path"].endswith("model.safetensors"))
    assert (
        sha256_file(Path(weights["path"]))
        == weights["sha256"]
        == hub_repo.commits[hub_repo.refs["main"]]["model.safetensors"].sha256
    )
