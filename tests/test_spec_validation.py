"""`cortex validate`: every malformed spec gets `FILE:LINE: field: message` and exit 2, no traceback."""

from __future__ import annotations

import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.commands.schema import schema_text
from cortex.specfile import SpecError, load_spec, spec_files

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
OK = "name: m\nsource:\n  repo: org/model\n"

# (file name, text, expected line, field path, a fragment of the message)
BAD: list[tuple[str, str, int, str, str]] = [
    ("empty", "", 1, "(spec)", "empty"),
    ("only-comment", "# nothing\n", 1, "(spec)", "empty"),
    ("a-list", "- name: m\n", 1, "(spec)", "mapping"),
    ("a-scalar", "hello\n", 1, "(spec)", "mapping"),
    ("yaml-syntax", "name: m\n source: [\n", 2, "(yaml)", "YAML syntax"),
    ("yaml-unclosed", "name: m\nsource: {repo: a/b\n", 3, "(yaml)", "YAML syntax"),
    ("yaml-tab", "name: m\nsource:\n\trepo: a/b\n", 3, "(yaml)", "YAML syntax"),
    ("duplicate-key", OK + "name: n\n", 4, "(yaml)", "appears twice"),
    ("missing-name", "source:\n  repo: a/b\n", 1, "name", "required"),
    ("missing-source", "name: m\n", 1, "source", "required"),
    ("empty-source", "name: m\nsource: {}\n", 2, "source", "no source given"),
    ("two-sources", "name: m\nsource:\n  repo: a/b\n  path: /tmp/x\n", 2, "source", "two sources"),
    ("three-sources", "name: m\nsource:\n  path: /x\n  gguf: /x.gguf\n  repo: a/b\n", 2, "source", "two sources"),
    ("bad-repo", "name: m\nsource:\n  repo: not a repo\n", 3, "source.repo", "owner/name"),
    ("gguf-not-gguf", "name: m\nsource:\n  gguf: model.bin\n", 3, "source.gguf", ".gguf"),
    ("include-without-repo", "name: m\nsource:\n  path: /x\n  include: ['*.json']\n", 2, "source", "include"),
    ("unknown-top-key", OK + "engin: vllm\n", 4, "engin", "did you mean 'engine'"),
    (
        "unknown-nested-key",
        OK + "resources:\n  gpu_memmory: 46GiB\n",
        5,
        "resources.gpu_memmory",
        "did you mean 'gpu_memory'",
    ),
    (
        "unknown-source-key",
        "name: m\nsource:\n  repo: a/b\n  revison: main\n",
        4,
        "source.revison",
        "did you mean 'revision'",
    ),
    ("name-not-dns", "name: My_Model\nsource:\n  repo: a/b\n", 1, "name", "DNS-safe"),
    ("name-too-long", "name: " + "a" * 70 + "\nsource:\n  repo: a/b\n", 1, "name", "DNS-safe"),
    ("name-number", "name: 42\nsource:\n  repo: a/b\n", 1, "name", "string"),
    ("alias-repeats-name", OK + "aliases: [m]\n", 1, "(spec)", "alias"),
    ("alias-twice", OK + "aliases: [a, b, a]\n", 4, "aliases", "listed twice"),
    ("fallback-twice", OK + "fallbacks: [a, b, a]\n", 4, "fallbacks", "listed twice"),
    ("fallback-to-itself", OK + "fallbacks: [m]\n", 1, "(spec)", "fallback names this model itself"),
    ("fallback-to-own-alias", OK + "aliases: [x]\nfallbacks: [x]\n", 1, "(spec)", "fallback names this model"),
    ("fallback-bad-name", OK + "fallbacks: ['has space']\n", 4, "fallbacks", "characters a model name"),
    ("bad-task", OK + "task: chat\n", 4, "task", "generate"),
    ("bad-engine", OK + "engine: tgi\n", 4, "engine", "vllm"),
    ("vllm-for-gguf", "name: m\nsource:\n  gguf: /x.gguf\nengine: vllm\n", 1, "(spec)", "GGUF"),
    ("bad-quant", OK + "quantization: Q9_9\n", 4, "quantization", "not a GGUF type"),
    ("negative-gpus", OK + "resources:\n  gpus: -1\n", 5, "resources.gpus", ">= 0"),
    ("negative-memory", OK + "resources:\n  gpu_memory: -5GB\n", 5, "resources.gpu_memory", "not a size"),
    ("memory-no-unit", OK + "resources:\n  gpu_memory: 46.5\n", 5, "resources.gpu_memory", "unit"),
    ("concurrency-word", OK + "resources:\n  concurrency: many\n", 5, "resources.concurrency", "integer"),
    (
        "concurrency-zero",
        OK + "resources:\n  concurrency: 0\n",
        5,
        "resources.concurrency",
        "greater than or equal to 1",
    ),
    ("duplicate-gpu-ids", OK + "resources:\n  gpus: [0, 0]\n", 5, "resources.gpus", "twice"),
    ("bad-runtime", OK + "runtime: k8s\n", 4, "runtime", "docker"),
    (
        "util-over-one",
        OK + "vllm:\n  gpu_memory_utilization: 1.5\n",
        5,
        "vllm.gpu_memory_utilization",
        "less than or equal to 1",
    ),
    ("tp-zero", OK + "vllm:\n  tensor_parallel_size: 0\n", 5, "vllm.tensor_parallel_size", "greater than or equal"),
    ("bad-block-size", OK + "vllm:\n  block_size: 7\n", 5, "vllm.block_size", "16"),
    ("enforce-eager-word", OK + "vllm:\n  enforce_eager: maybe\n", 5, "vllm.enforce_eager", "boolean"),
    ("split-all-zero", OK + "llamacpp:\n  tensor_split: [0, 0]\n", 5, "llamacpp.tensor_split", "positive share"),
    ("bad-cache-type", OK + "llamacpp:\n  cache_type_k: q3\n", 5, "llamacpp.cache_type_k", "q8_0"),
    ("bad-split-mode", OK + "llamacpp:\n  split_mode: columns\n", 5, "llamacpp.split_mode", "row"),
    ("extra-arg-port", OK + "llamacpp:\n  extra_args: ['--port', '9000']\n", 5, "llamacpp.extra_args", "set by Cortex"),
    ("extra-arg-api-key", OK + "vllm:\n  extra_args: ['--api-key=x']\n", 5, "vllm.extra_args", "set by Cortex"),
    ("extra-arg-host", OK + "vllm:\n  extra_args: ['--host', '0.0.0.0']\n", 5, "vllm.extra_args", "set by Cortex"),
    ("extra-arg-unknown", OK + "vllm:\n  extra_args: ['--turbo']\n", 5, "vllm.extra_args", "not a flag of vLLM"),
    (
        "extra-arg-typo",
        OK + "llamacpp:\n  extra_args: ['--ctx-sizee', '4']\n",
        5,
        "llamacpp.extra_args",
        "did you mean --ctx-size",
    ),
    (
        "extra-arg-has-setting",
        OK + "llamacpp:\n  extra_args: ['-ngl', '4']\n",
        5,
        "llamacpp.extra_args",
        "llamacpp.ngl",
    ),
    (
        "extra-arg-swap-removed",
        OK + "vllm:\n  extra_args: ['--swap-space', '4']\n",
        5,
        "vllm.extra_args",
        "not a flag of vLLM",
    ),
    # issue 15 section 3: each dangerous class is refused with its class and the way out
    (
        "extra-arg-log-file",
        OK + "llamacpp:\n  extra_args: ['--log-file', '/etc/passwd']\n",
        5,
        "llamacpp.extra_args",
        "file-write",
    ),
    (
        "extra-arg-tools",
        OK + "llamacpp:\n  extra_args: ['--tools', 'all']\n",
        5,
        "llamacpp.extra_args",
        "tool-execution",
    ),
    (
        "extra-arg-rpc",
        OK + "llamacpp:\n  extra_args: ['--rpc', '10.0.0.9:50052']\n",
        5,
        "llamacpp.extra_args",
        "remote-backend",
    ),
    (
        "extra-arg-vllm-config",
        OK + "vllm:\n  extra_args: ['--config', '/tmp/c.yaml']\n",
        5,
        "vllm.extra_args",
        "config-file",
    ),
    (
        "extra-arg-positional",
        OK + "llamacpp:\n  extra_args: ['other.gguf']\n",
        5,
        "llamacpp.extra_args",
        "bare positional",
    ),
    (
        "extra-arg-template-file",
        OK + "llamacpp:\n  extra_args: ['--chat-template-file', '/x.jinja']\n",
        5,
        "llamacpp.extra_args",
        "unsafe_extra_args: true",
    ),
    (
        "extra-arg-unsafe-port",
        OK + "llamacpp:\n  unsafe_extra_args: true\n  extra_args: ['--port', '1']\n",
        6,
        "llamacpp.extra_args",
        "set by Cortex",
    ),
    ("engine-env-token", OK + "llamacpp:\n  env: {HF_TOKEN: hf_x}\n", 5, "llamacpp.env", "secrets"),
    ("engine-env-preload", OK + "vllm:\n  env: {LD_PRELOAD: /x.so}\n", 5, "vllm.env", "not a variable a spec may give"),
    ("engine-env-llama-arg", OK + "llamacpp:\n  env: {LLAMA_ARG_LOG_FILE: /x}\n", 5, "llamacpp.env", "extra_args"),
    ("bad-cron", OK + "schedule:\n  cron: '99 * * *'\n", 5, "schedule.cron", "cron"),
    ("cron-missing", OK + "schedule:\n  timezone: UTC\n", 4, "schedule.cron", "required"),
    (
        "bad-timezone",
        OK + "schedule:\n  cron: '0 3 * * *'\n  timezone: Mars/Olympus\n",
        6,
        "schedule.timezone",
        "timezone",
    ),
    ("gate-without-bound", OK + "benchmark:\n  gates:\n    - metric: ttft_ms\n", 6, "benchmark.gates[0]", "max"),
    (
        "gate-bad-metric",
        OK + "benchmark:\n  gates:\n    - {metric: vibes, max: 1}\n",
        6,
        "benchmark.gates[0].metric",
        "ttft_ms",
    ),
    ("bench-negative-requests", OK + "benchmark:\n  requests: -3\n", 5, "benchmark.requests", "greater than or equal"),
    ("bench-empty-levels", OK + "benchmark:\n  concurrency: []\n", 5, "benchmark.concurrency", "at least 1"),
    ("tests-empty-prompt", OK + "tests:\n  prompts: ['']\n", 5, "tests.prompts[0]", "at least 1"),
    # issue 12: replicas and placement
    ("replicas-zero", OK + "replicas: 0\n", 4, "replicas", "greater than or equal to 1"),
    ("replicas-negative", OK + "replicas: -2\n", 4, "replicas", "greater than or equal to 1"),
    ("replicas-huge", OK + "replicas: 100000\n", 4, "replicas", "less than or equal to 1024"),
    ("replicas-word", OK + "replicas: two\n", 4, "replicas", "integer"),
    ("spread-unknown", OK + "placement:\n  spread: rack\n", 5, "placement.spread", "'host' or 'none'"),
    ("placement-typo", OK + "placement:\n  label: {gpu: h100}\n", 5, "placement.label", "did you mean 'labels'"),
    ("labels-a-list", OK + "placement:\n  labels: [gpu, h100]\n", 5, "placement.labels", "mapping of key: value"),
    ("labels-number", OK + "placement:\n  labels:\n    gpus: 8\n", 5, "placement.labels", "quote it"),
    ("labels-bad-key", OK + "placement:\n  labels:\n    'a b': x\n", 5, "placement.labels", "not a label name"),
    ("hosts-empty", OK + "placement:\n  hosts: []\n", 5, "placement.hosts", "empty allow-list"),
    ("hosts-twice", OK + "placement:\n  hosts: [gpu-1, GPU-1]\n", 5, "placement.hosts", "listed twice"),
    ("hosts-bad-name", OK + "placement:\n  hosts: ['gpu 1']\n", 5, "placement.hosts", "not a host name"),
]


def test_there_are_at_least_30_malformed_specs() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("name,text,line,field,fragment", BAD, ids=[b[0] for b in BAD])
def test_malformed_spec_names_file_line_field(
    tmp_path: Path, name: str, text: str, line: int, field: str, fragment: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    rendered = [str(p) for p in info.value.problems]
    hit = [p for p in info.value.problems if p.field == field and fragment.lower() in p.message.lower()]
    assert hit, f"expected {field}: ...{fragment}... in {rendered}"
    assert hit[0].line == line, rendered
    assert rendered[0].startswith(f"{path}:")


def test_validate_command_exit_code_and_format(tmp_path: Path) -> None:
    """One real `cortex validate` run over every malformed spec plus a good one."""
    for name, text, *_ in BAD:
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "good.yaml").write_text(OK)
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "validate", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    pattern = re.compile(r"^(?P<file>/\S+\.yaml):(?P<line>\d+): (?P<field>\S+): (?P<msg>.+)$")
    files_with_problems = set()
    for line in proc.stderr.splitlines()[:-1]:
        m = pattern.match(line)
        assert m, f"not FILE:LINE: field: message: {line!r}"
        files_with_problems.add(Path(m["file"]).stem)
    assert files_with_problems == {b[0] for b in BAD}
    assert "good.yaml: ok" in proc.stdout


def test_examples_are_valid() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "validate", str(SPECS)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert len(spec_files([SPECS])) >= 7


def test_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "validate", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "nope.yaml:1: (file): no such file" in proc.stderr


@pytest.mark.parametrize("command", [["prepare"], ["deploy"], ["deploy", "--fleet"], ["compare-engines"]])
def test_flow_commands_refuse_a_bad_spec_before_any_flow_runs(tmp_path: Path, command: list[str]) -> None:
    """The spec is checked in the CLI: one line and exit 2, no Prefect run or traceback. The
    Prefect API points at a closed port, so reaching Prefect at all would fail differently."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: 3\n")
    env = os.environ | {"PREFECT_API_URL": "http://127.0.0.1:9/api", "CORTEX_HOME": str(tmp_path / "home")}
    for path, expected in ((tmp_path / "nope.yaml", "nope.yaml:1: (file): no such file"), (bad, "bad.yaml:2: source:")):
        proc = subprocess.run(
            [sys.executable, "-m", "cli", *command, str(path)], capture_output=True, text=True, timeout=60, env=env
        )
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "Flow run" not in proc.stderr + proc.stdout


def test_argparse_spellings_of_known_flags_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        OK + "vllm:\n  extra_args: ['--seed', '1', '--disable_log_stats', '--compilation-config.mode', '3']\n"
    )
    assert load_spec(path).vllm.extra_args[0] == "--seed"
    path.write_text(OK + "vllm:\n  extra_args: ['--max_num_seqs', '4']\n")
    with pytest.raises(SpecError, match="vllm.max_num_seqs"):
        load_spec(path)


def test_relative_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.yaml").write_text("name: m\nsource:\n  gguf: ../models/x.gguf\n")
    spec = load_spec(tmp_path / "sub" / "s.yaml")
    assert spec.source.gguf == str(tmp_path / "models" / "x.gguf")
    assert spec.source.kind == "gguf_file"


def test_schema_json_is_current() -> None:
    committed = (SPECS / "schema.json").read_text()
    assert committed == schema_text(), "specs/schema.json is stale: run `cortex schema`"


def test_local_paths_expand_defaulted_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`${VAR:-default}` as in a shell: the example GGUF spec finds the test model wherever
    CORTEX_CACHE puts the cache, and under ~/.cache/cortex when it is unset or empty."""
    from cortex.specfile import expand_path

    monkeypatch.setenv("HOME", str(tmp_path))
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("CORTEX_CACHE", raising=False)
        else:
            monkeypatch.setenv("CORTEX_CACHE", unset)
        assert expand_path("${CORTEX_CACHE:-~/.cache/cortex}/m.gguf") == f"{tmp_path}/.cache/cortex/m.gguf"
    monkeypatch.setenv("CORTEX_CACHE", "/srv/cache")
    assert expand_path("${CORTEX_CACHE:-~/.cache/cortex}/m.gguf") == "/srv/cache/m.gguf"
    spec = load_spec(SPECS / "smollm2-135m-instruct-gguf.yaml")
    assert spec.source.gguf == "/srv/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
