"""No flag Cortex emits is unknown to the engine it is for: checked against the real engines.

Every entry of both flag tables, the fixed server arguments, and a launch built from a spec
that sets every setting, against the built `llama-server --help` and vLLM's own parser.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cortex.engines import flag_names
from cortex.engines import llamacpp, vllm
from cortex.engines.introspect import llama_server_table, vllm_table
from cortex.hardware import Gpu, Inventory
from cortex.launch import build_launch
from cortex.facts import facts_from_config
from cortex.plan import make_plan
from cortex.specfile import parse_spec_text

SMOL_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_hidden_layers=30,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def live_llama(toolchain):
    return llama_server_table(toolchain)


@pytest.fixture(scope="module")
def live_vllm(vllm_install):
    return vllm_table(vllm_install)


def test_every_llamacpp_table_flag_exists(live_llama) -> None:
    emitted = (
        [m.flag for m in llamacpp.FLAGS]
        + flag_names(llamacpp.server_args(model_path="/m.gguf", served_name="x", port=8080, embed=True))
        + llamacpp.RESERVED
    )
    unknown = [f for f in emitted if f not in live_llama]
    assert not unknown, f"llama-server {live_llama.version} does not accept {unknown}"


def test_every_vllm_table_flag_exists(live_vllm) -> None:
    emitted = [m.flag for m in vllm.FLAGS if m.kind != "removed"] + [m.negative for m in vllm.FLAGS if m.negative]
    emitted += flag_names(vllm.server_args(model_path="/m", served_name="x", port=8000, embed=True)) + vllm.RESERVED
    unknown = [f for f in emitted if f not in live_vllm]
    assert not unknown, f"vLLM {live_vllm.version} does not accept {unknown}"


def test_removed_vllm_flags_really_are_gone(live_vllm) -> None:
    for m in vllm.FLAGS:
        if m.kind == "removed":
            assert m.flag not in live_vllm, f"{m.flag} exists in vLLM {live_vllm.version}: do not mark it removed"


def test_full_llamacpp_launch_is_accepted(live_llama, test_model) -> None:
    spec = parse_spec_text(
        f"""
name: every-flag
source: {{gguf: {test_model.gguf}}}
task: embed
llamacpp:
  ngl: 10
  split_mode: layer
  tensor_split: [1, 1]
  batch_size: 256
  ubatch_size: 128
  threads: 2
  context_size: 4096
  parallel: 2
  rope_freq_base: 10000
  rope_freq_scale: 1.0
  flash_attention: "on"
  mlock: true
  no_mmap: true
  numa: distribute
  cache_type_k: q8_0
  cache_type_v: q8_0
  pooling: mean
  extra_args: ["--temp", "0.5"]
""",
        "every-flag.yaml",
    )
    from cortex.facts import gguf_facts

    plan = make_plan(spec, gguf_facts(test_model.gguf), Inventory([Gpu(0, 8 * 2**30), Gpu(1, 8 * 2**30)], 2, 2**34))
    launch = build_launch(spec, plan)
    used = flag_names(launch.command[1:])
    assert {
        "-ngl",
        "-ts",
        "-sm",
        "-c",
        "-np",
        "-b",
        "-ub",
        "-t",
        "-fa",
        "-lm",
        "--numa",
        "-ctk",
        "-ctv",
        "--rope-freq-base",
        "--rope-freq-scale",
        "--embeddings",
        "--pooling",
        "--temp",
    } <= set(used)
    assert [f for f in used if f not in live_llama] == []
    cmd = launch.command
    assert cmd[cmd.index("-lm") + 1] == "mlock"  # mlock + no_mmap, translated for this llama.cpp


def test_full_vllm_launch_is_accepted(live_vllm, tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps(SMOL_CONFIG))
    spec = parse_spec_text(
        f"""
name: every-flag
source: {{path: {tmp_path}}}
engine: vllm
task: embed
vllm:
  tensor_parallel_size: 1
  pipeline_parallel_size: 1
  dtype: bfloat16
  gpu_memory_utilization: 0.8
  max_model_len: 2048
  kv_cache_dtype: fp8
  quantization: fp8
  block_size: 16
  enforce_eager: false
  enable_prefix_caching: true
  enable_chunked_prefill: false
  cuda_graph_sizes: [1, 2, 4]
  max_num_seqs: 8
  trust_remote_code: true
  extra_args: ["--seed", "1"]
""",
        "every-flag.yaml",
    )
    facts = facts_from_config(SMOL_CONFIG)
    plan = make_plan(spec, facts, Inventory([Gpu(0, 8 * 2**30)], 2, 2**34))
    launch = build_launch(spec, plan)
    used = flag_names(launch.command[3:])
    assert {
        "--no-enforce-eager",
        "--enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--cudagraph-capture-sizes",
        "--runner",
        "--gpu-memory-utilization",
        "--kv-cache-dtype",
        "--trust-remote-code",
        "--seed",
    } <= set(used)
    assert [f for f in used if f not in live_vllm] == []


def test_swap_space_is_a_clear_error_for_vllm_0_32(tmp_path: Path) -> None:
    import json

    from cortex.engines import FlagError

    (tmp_path / "config.json").write_text(json.dumps(SMOL_CONFIG))
    spec = parse_spec_text(
        f"name: s\nsource: {{path: {tmp_path}}}\nengine: vllm\nvllm:\n  swap_space_gb: 4\n", "s.yaml"
    )
    plan = make_plan(spec, facts_from_config(SMOL_CONFIG), Inventory([Gpu(0, 8 * 2**30)], 2, 2**34))
    with pytest.raises(FlagError, match="removed --swap-space"):
        build_launch(spec, plan)


# --- `cortex validate` / `cortex plan` on the issue's dangerous extra_args (issue 15 §3) -----


def _cortex(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "section,args,klass",
    [
        ("llamacpp", "['--log-file', '/etc/cron.d/x']", "file-write"),
        ("llamacpp", "['--tools', 'all']", "tool-execution"),
        ("llamacpp", "['--rpc', '10.0.0.9:50052']", "remote-backend"),
        ("llamacpp", "['other.gguf']", "bare positional"),
    ],
)
def test_validate_and_plan_refuse_the_issues_examples(
    test_model, tmp_path: Path, section: str, args: str, klass: str
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: bad\nsource:\n  gguf: {test_model.gguf}\n{section}:\n  extra_args: {args}\n")
    for command in ("validate", "plan"):
        proc = _cortex(command, str(spec))
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert f"{spec}:5: {section}.extra_args: " in proc.stderr and klass in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_vllm_config_file_indirection_is_refused_by_validate(tmp_path: Path) -> None:
    spec = tmp_path / "cfg.yaml"
    spec.write_text("name: cfg\nsource:\n  repo: org/model\nvllm:\n  extra_args: ['--config', '/tmp/opts.yaml']\n")
    proc = _cortex("validate", str(spec))
    assert proc.returncode == 2
    assert f"{spec}:5: vllm.extra_args: --config is refused: config-file" in proc.stderr
    assert "vllm.unsafe_extra_args: true" in proc.stderr


def test_unsafe_extra_args_passes_with_a_loud_plan_and_the_flags_reach_argv(test_model, tmp_path: Path) -> None:
    spec = tmp_path / "risky.yaml"
    spec.write_text(
        f"name: risky\nsource:\n  gguf: {test_model.gguf}\nllamacpp:\n  unsafe_extra_args: true\n"
        "  extra_args: ['--log-file', '/tmp/risky.log', '--temp', '0.5']\n"
    )
    proc = _cortex("plan", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("!! UNSAFE: llamacpp.unsafe_extra_args is true") == 2  # first and last
    assert "!!   --log-file (file-write:" in proc.stdout
    assert "--temp (" not in proc.stdout  # a safe flag is not called unsafe
    planned = _cortex("plan", "--json", str(spec))
    import json

    data = json.loads(planned.stdout)
    assert [u.split(" ")[0] for u in data["plan"]["unsafe_extra_args"]] == ["--log-file"]
    command = data["launch"]["command"]
    assert command[command.index("--temp") + 1] == "0.5"
    assert command[command.index("--log-file") + 1] == "/tmp/risky.log"


def test_the_prepare_report_shows_unsafe_extra_args_first(test_model, tmp_path: Path) -> None:
    """The Prefect markdown artifact of a prepare run (render_report) puts the warning on top."""
    from cortex.facts import gguf_facts
    from cortex.prepared import Prepared, render_report

    spec = parse_spec_text(
        f"name: risky\nsource: {{gguf: {test_model.gguf}}}\nllamacpp:\n"
        "  unsafe_extra_args: true\n  extra_args: ['--tools', 'all']\n",
        "risky.yaml",
    )
    plan = make_plan(spec, gguf_facts(test_model.gguf), Inventory([], 2, 2**34))
    prepared = Prepared(
        name="risky",
        engine="llamacpp",
        format="gguf",
        quantization="Q4_1",
        source={"kind": "gguf_file"},
        source_revision="x",
        artifact_path=test_model.gguf,
        files=[],
        cached=True,
        downloaded_bytes=0,
        resumed_bytes=0,
        built=[],
        predicted_bytes={},
        plan=plan,
    )
    report = render_report(prepared).splitlines()
    assert report[2] == "## ⚠️ UNSAFE extra_args"
    assert any(line.startswith("- **`--tools`** (tool-execution:") for line in report[3:8])
