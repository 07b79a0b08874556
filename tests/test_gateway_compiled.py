"""The gateway's compiled build (cortex/gateway/compiled.py): which source a build belongs to,
what a process without one runs, and that the gateway `./dev` sets up runs the compiled build.
Also the small pieces of the request path that changed with it (usage_int, the token cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cortex.gateway import compiled
from cortex.gateway.app import usage_int
from cortex.gateway.routing import RoutingTable
from cortex.testing.gateway import Gateways

ROOT = Path(__file__).resolve().parents[1]


def _copy_package(tmp_path: Path) -> Path:
    package = tmp_path / "cortex"
    shutil.copytree(compiled.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    return package


def test_a_build_belongs_to_the_exact_source_of_each_compiled_module(tmp_path):
    package = _copy_package(tmp_path)
    key = compiled.build_key(package)
    assert key == compiled.build_key(compiled.PACKAGE)
    # a module outside the compiled set changes nothing
    (package / "gateway" / "errors.py").write_text((package / "gateway" / "errors.py").read_text() + "\n# x\n")
    assert compiled.build_key(package) == key
    # any byte of any compiled module makes it another build
    for name in compiled.MODULES:
        source = package / "gateway" / f"{name}.py"
        before = source.read_bytes()
        source.write_bytes(before + b"\n")
        assert compiled.build_key(package) != key, name
        source.write_bytes(before)
    assert compiled.build_key(package) == key


def _install_in_subprocess(env: dict[str, str]) -> str:
    code = "from cortex.gateway import compiled; print(compiled.install())"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True, cwd=ROOT
    )
    return done.stdout.strip()


def test_without_a_build_the_gateway_runs_its_source_and_says_how_to_build(tmp_path):
    said = _install_in_subprocess({"CORTEX_CACHE": str(tmp_path / "empty-cache")})
    assert said.startswith("interpreted (no compiled build of this source")
    assert "python -m cortex.gateway.compiled build" in said


def test_the_compiled_build_can_be_turned_off():
    assert _install_in_subprocess({"CORTEX_GATEWAY_COMPILED": "0"}) == "interpreted (CORTEX_GATEWAY_COMPILED=0)"


def test_install_after_the_modules_were_imported_changes_nothing():
    code = (
        "import cortex.gateway.app\nfrom cortex.gateway import compiled\n"
        "print(compiled.install()); print(not cortex.gateway.app.__file__.endswith('.py'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    said, now = done.stdout.strip().splitlines()
    assert said.startswith("interpreted (already imported before install()") and now == "False"


@pytest.mark.parts  # needs the compiled build that `./dev test` sets up
def test_the_gateway_process_runs_the_compiled_build(tmp_path):
    gateways = Gateways(tmp_path)
    try:
        gw = gateways()
        health = httpx.get(gw.url + "/health").json()
        log = gw.log()
    finally:
        gateways.stop_all()
    why = _install_in_subprocess({})
    assert health["code"] == "compiled", (
        f"the gateway ran its source interpreted: {why}. `./dev setup` (or "
        "`python -m cortex.gateway.compiled build`) builds it for this source"
    )
    assert "gateway code: compiled (mypyc build" in log


@pytest.mark.parametrize(
    "data, name, expected",
    [
        (b'{"usage":{"prompt_tokens":12,"completion_tokens":345}}', b'"prompt_tokens"', 12),
        (b'{"usage":{"prompt_tokens":12,"completion_tokens":345}}', b'"completion_tokens"', 345),
        (b'{"usage": {"prompt_tokens" :\n 7 }}', b'"prompt_tokens"', 7),
        (b'{"usage":{"prompt_tokens":null}}', b'"prompt_tokens"', None),
        (b'{"usage":{"prompt_tokens"', b'"prompt_tokens"', None),
        (b'{"usage":{"prompt_tokens":', b'"prompt_tokens"', None),
        (b'{"usage":{}}', b'"prompt_tokens"', None),
        (b'{"usage":{"prompt_tokens":0}}', b'"prompt_tokens"', 0),
    ],
)
def test_usage_int_reads_what_the_regex_it_replaced_read(data, name, expected):
    assert usage_int(data, name, data.find(b'"usage"')) == expected


def test_the_token_cache_is_emptied_by_every_registry_change():
    table = RoutingTable(1.0)
    table.keys_by_token[b"sk-cortex-x"] = object()  # type: ignore[assignment]
    table.sync([], {}, [], {})
    assert table.keys_by_token == {}
