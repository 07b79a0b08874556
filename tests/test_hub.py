"""cortex.hub against the real huggingface_hub client and a local Hub endpoint (tests/hubserver.py)
serving a repo made from the real SmolLM2-135M-Instruct checkpoint (the `test_model` fixture).

Each test names the client path it proves. No test talks to huggingface.co."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cortex import hub
from hubserver import HubRepo, HubServer, sha256_file

TOKEN = "hf_cortexTestTokenDoNotLeak0123456789"
REPO = "acme/smollm2-135m"


@pytest.fixture(scope="module")
def repo_folder(test_model, tmp_path_factory) -> Path:
    """The HF checkpoint plus files a minimal fetch must leave alone (a README, PyTorch
    pickles, a GGUF): links, not copies, to keep the disk use small."""
    folder = tmp_path_factory.mktemp("repo")
    for src in Path(test_model.hf_dir).iterdir():
        if src.is_file() and not src.name.startswith("."):
            os.symlink(src, folder / src.name)
    (folder / "README.md").write_text("# SmolLM2 135M, re-hosted for Cortex tests\n")
    os.symlink(test_model.gguf, folder / "smollm2-135m-q4_1.gguf")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 2048)
    return folder


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Fresh HF cache and Cortex cache; the endpoint is set per test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CORTEX_CACHE", str(tmp_path / "cortex"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


def _serve(folder: Path, **kw) -> tuple[HubServer, HubRepo]:
    repo = HubRepo.from_folder(REPO, folder)
    return HubServer([repo], **kw).start(), repo


def _weights(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def test_fetch_pins_the_commit_and_fetches_only_what_is_needed(repo_folder, hub_env, monkeypatch):
    """Client paths: HfApi.resolve_revision (GET /api/models/{repo}/revision/main),
    HfApi.model_info(files_metadata=True) for sizes and LFS sha256, get_hf_file_metadata (HEAD),
    http_get (GET) for the LFS weights, snapshot_download (tree listing + hf_hub_download) for the
    small files and the snapshot links."""
    server, repo = _serve(repo_folder)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    first = repo.refs["main"]
    try:
        snap = hub.fetch(REPO, "main")
        assert snap.commit == first
        names = {f.path for f in snap.files}
        assert "config.json" in names and _weights(repo_folder).name in names
        assert not names & {"README.md", "pytorch_model.bin", "smollm2-135m-q4_1.gguf"}
        for unwanted in ("README.md", "pytorch_model.bin", "smollm2-135m-q4_1.gguf"):
            assert server.gets_of(unwanted) == [], f"{unwanted} was downloaded"
        weights = snap.path(_weights(repo_folder).name)
        assert sha256_file(weights) == sha256_file(_weights(repo_folder))
        assert snap.downloaded_bytes == snap.total_bytes
        # The layout is huggingface_hub's own: snapshot links into content-addressed blobs.
        assert weights.is_symlink() and weights.resolve().name == sha256_file(_weights(repo_folder))

        # `main` moves on; a spec pinned to the first commit still gets the first commit.
        (hub_env / "extra").mkdir()
        changed = {p.name: p for p in repo_folder.iterdir()}
        changed["config.json"] = hub_env / "extra" / "config.json"
        changed["config.json"].write_text(
            json.dumps({**json.loads((repo_folder / "config.json").read_text()), "comment": "second commit"})
        )
        second = repo.commit(changed)
        assert hub.resolve_revision(REPO, "main") == second
        pinned = hub.fetch(REPO, first)
        assert pinned.commit == first and pinned.downloaded_bytes == 0
        assert "comment" not in json.loads(pinned.path("config.json").read_text())
    finally:
        server.stop()


def test_second_fetch_moves_nothing_and_offline_works_from_the_cache(repo_folder, hub_env, monkeypatch):
    """Client paths: the cached-pointer shortcut of hf_hub_download (commit sha + existing
    snapshot file: no HEAD, no GET), and with HF_HUB_OFFLINE=1 in a fresh process
    HfApi.resolve_revision(local_files_only=True) reading refs/main."""
    server, _ = _serve(repo_folder)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        first = hub.fetch(REPO, "main")
        before = len(server.requests)
        again = hub.fetch(REPO, "main")
        assert again.downloaded_bytes == 0 and again.commit == first.commit
        new = [(r.method, r.path) for r in server.requests[before:]]
        assert new == [("GET", f"/api/models/{REPO}/revision/main")], new  # only the branch lookup
    finally:
        server.stop()
    out = _run_fetch({"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert out["commit"] == first.commit and out["downloaded_bytes"] == 0


def test_offline_with_a_cold_cache_fails_clearly(hub_env):
    """Client path: HfApi.resolve_revision(local_files_only=True) with no refs/ entry
    (RevisionResolutionError), turned into Cortex's OfflineCacheMiss."""
    proc = _run_fetch({"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}, check=False)
    assert proc.returncode != 0
    assert "OfflineCacheMiss" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr, proc.stderr


def test_an_unreachable_hub_is_worth_a_retry_and_says_how_to_use_the_cache(hub_env):
    """Client path: HfApi.resolve_revision meeting a refused connection (a transport error),
    turned into HubUnreachable, whose message points at offline mode for a cached model."""
    proc = _run_fetch({"HF_ENDPOINT": "http://127.0.0.1:9"}, check=False)
    assert proc.returncode != 0
    assert "HubUnreachable" in proc.stderr and "set HF_HUB_OFFLINE=1" in proc.stderr, proc.stderr


def test_a_killed_download_resumes_where_it_stopped(repo_folder, hub_env, monkeypatch):
    """Client path: http_get(resume_size=N) sending `Range: bytes=N-` and appending to Cortex's
    partial blob, after the first process was SIGKILLed mid-file (huggingface_hub itself would
    start again from zero: its temporary names are per process)."""
    server, _ = _serve(repo_folder, throttle_bytes_per_s=40_000_000)
    weights = _weights(repo_folder)
    size = weights.stat().st_size
    env = {"HF_ENDPOINT": server.url}
    try:
        proc = _start_fetch(env)
        partial = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = list((hub_env / "hf").glob("models--*/blobs/*.cortex-partial"))
            if found and found[0].stat().st_size > size // 4:
                partial = found[0]
                break
            time.sleep(0.05)
        assert partial is not None, "the download never got a quarter of the way"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = partial.stat().st_size
        assert 0 < kept < size, "the kill should land mid-file"

        server.throttle_bytes_per_s = None
        out = _run_fetch(env)
        gets = server.gets_of(weights.name)
        assert len(gets) == 2
        assert gets[0].range is None
        assert gets[1].range == f"bytes={kept}-" and gets[1].status == 206
        assert out["resumed_bytes"] == kept
        assert out["downloaded_bytes"] == out["total_bytes"] - kept
        final = Path(out["folder"]) / weights.name
        assert sha256_file(final) == sha256_file(weights)
        assert not list((hub_env / "hf").glob("models--*/blobs/*.cortex-partial"))
    finally:
        server.stop()


def test_a_flipped_byte_on_disk_is_detected_and_refetched(repo_folder, hub_env, monkeypatch):
    """Client paths: snapshot file check against model_info's LFS sha256 (Cortex), then
    get_hf_file_metadata + http_get for the fresh copy and snapshot_download to relink it."""
    server, _ = _serve(repo_folder)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    name = _weights(repo_folder).name
    try:
        snap = hub.fetch(REPO, "main")
        blob = snap.path(name).resolve()
        with open(blob, "r+b") as f:
            f.seek(blob.stat().st_size // 3)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x01]))
        again = hub.fetch(REPO, "main")
        assert again.refetched == (name,)
        assert len(server.gets_of(name)) == 2
        assert sha256_file(again.path(name)) == sha256_file(_weights(repo_folder))
    finally:
        server.stop()


def test_a_corrupted_transfer_is_detected_and_refetched(repo_folder, hub_env, monkeypatch):
    """Client path: http_get delivering one flipped byte (the server corrupts one response);
    the sha256 check rejects it before it becomes a blob, and the second transfer is used."""
    server, _ = _serve(repo_folder)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    name = _weights(repo_folder).name
    server.flip_byte_in_next_get(name)
    try:
        snap = hub.fetch(REPO, "main")
        assert snap.refetched == (name,)
        assert len(server.gets_of(name)) == 2
        assert sha256_file(snap.path(name)) == sha256_file(_weights(repo_folder))
    finally:
        server.stop()


def test_not_enough_space_is_a_clear_error_before_any_byte_moves(repo_folder, hub_env, monkeypatch):
    """Client paths: resolve_revision + model_info only; the space check runs before any GET.
    The HF cache sits on a real 20 MB tmpfs, smaller than the 270 MB checkpoint."""
    mount = hub_env / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20M", "tmpfs", str(mount)], capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"this test needs a 20 MB tmpfs (run the tests as root, or in a container with CAP_SYS_ADMIN): {result.stderr}"
    )
    server, _ = _serve(repo_folder)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(mount / "hf"))
    try:
        with pytest.raises(hub.NotEnoughSpace) as err:
            hub.fetch(REPO, "main")
        message = str(err.value)
        assert str(mount / "hf") in message and "needs" in message and "free" in message
        assert server.gets_of(_weights(repo_folder).name) == []
        leftovers = [p for p in (mount / "hf").rglob("*") if p.is_file()]
        assert not [p for p in leftovers if p.stat().st_size > 0 and "blobs" in p.parts], leftovers
    finally:
        server.stop()
        subprocess.run(["umount", str(mount)], check=True)


def test_a_private_repo_needs_the_token_and_the_token_stays_hidden(repo_folder, hub_env, monkeypatch):
    """Client paths: every call (model_info, HEAD, GET, tree) carries `Authorization: Bearer`
    built by build_hf_headers from the token Cortex hands it; without one the Hub's 401 becomes
    an error that says how to provide it."""
    server, _ = _serve(repo_folder, token=TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        with pytest.raises(hub.HubError) as err:
            hub.fetch(REPO, "main")
        assert "HF_TOKEN" in str(err.value)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        token = hub.token_from_env()
        assert TOKEN not in repr(token) and TOKEN not in str(token)
        snap = hub.fetch(REPO, "main", token=token)
        repo_calls = [r for r in server.requests if REPO in r.path]
        assert repo_calls and all(r.authorized for r in repo_calls if r.status < 400 and r.status != 0)
        assert TOKEN not in repr(snap)
        for path in (hub_env / "cortex").rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    finally:
        server.stop()


def test_a_gguf_repo_fetches_only_the_named_split_set(test_model, hub_env, monkeypatch, tmp_path):
    """Client paths: as for HF checkpoints, with the file list narrowed to one GGUF split set
    (`x-00001-of-00002.gguf` names both parts; another GGUF in the repo stays on the server)."""
    data = Path(test_model.gguf).read_bytes()
    folder = tmp_path / "ggufrepo"
    folder.mkdir()
    half = len(data) // 2
    (folder / "smol-Q4_1-00001-of-00002.gguf").write_bytes(data[:half])
    (folder / "smol-Q4_1-00002-of-00002.gguf").write_bytes(data[half:])
    os.symlink(test_model.gguf, folder / "smol-Q4_1.gguf")
    (folder / "README.md").write_text("split and whole\n")
    server = HubServer([HubRepo.from_folder("acme/smol-gguf", folder)]).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        snap = hub.fetch("acme/smol-gguf", "main", gguf="smol-Q4_1-00001-of-00002.gguf")
        assert [f.path for f in snap.files] == ["smol-Q4_1-00001-of-00002.gguf", "smol-Q4_1-00002-of-00002.gguf"]
        assert server.gets_of("smol-Q4_1.gguf") == [] and server.gets_of("README.md") == []
        joined = snap.path(snap.files[0].path).read_bytes() + snap.path(snap.files[1].path).read_bytes()
        assert joined == data
        with pytest.raises(hub.HubError, match="first part"):
            hub.fetch("acme/smol-gguf", "main", gguf="smol-Q4_1-00002-of-00002.gguf")
    finally:
        server.stop()


# --- a fetch in its own process (to kill it, or to give the client a fresh environment) ---

_FETCH = """
import json, sys
from dataclasses import asdict
from cortex import hub
snap = hub.fetch(sys.argv[1], "main", token=hub.token_from_env())
print(json.dumps({"commit": snap.commit, "folder": str(snap.folder), "downloaded_bytes": snap.downloaded_bytes,
                  "resumed_bytes": snap.resumed_bytes, "total_bytes": snap.total_bytes}))
"""


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(extra)
    return env


def _start_fetch(extra: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _FETCH, REPO],
        env=_child_env(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_fetch(extra: dict[str, str], check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-c", _FETCH, REPO], env=_child_env(extra), capture_output=True, text=True, timeout=300
    )
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_planning_facts_of_a_private_repo_use_the_one_hub_client(repo_folder, hub_env, monkeypatch):
    """`cortex plan` on an uncached HF repo reads config.json and the safetensors headers through
    hub.py (the same client, endpoint, offline rule and explicit token as downloads), never the
    weights; without the token the Hub's 401 becomes a planning error that says what to set."""
    from cortex.facts import FactsError, hf_dir_facts, hf_repo_facts

    server, _ = _serve(repo_folder, token=TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        with pytest.raises(FactsError, match="HF_TOKEN"):
            hf_repo_facts(REPO, "main")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        facts = hf_repo_facts(REPO, "main")
        weights = _weights(repo_folder).name
        assert sum(r.bytes_sent for r in server.gets_of(weights)) < 1 << 20  # the header, not the tensors
        local = hf_dir_facts(repo_folder)
        assert facts.params_total == local.params_total and facts.n_layers == local.n_layers
        assert all(r.authorized for r in server.requests if REPO in r.path and r.status < 400 and r.status != 0)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(FactsError, match="offline"):
            hf_repo_facts("acme/never-seen", "main")
    finally:
        server.stop()
