"""The plan's numbers against what the real llama.cpp tools write and report.

- Predicted GGUF sizes for SmolLM2 (F16, Q8_0, Q4_K_M) are within 2% of the files the pinned
  convert_hf_to_gguf.py and llama-quantize write (per-tensor types, k-quant fallbacks).
- The planned KV cache for a context and slot count equals what llama-server reports when it
  loads with those settings, and the weights and overhead (compute + output buffers) are
  within cortex.actual's 10%; cortex.actual reads the same figures from that real log, and
  says "could not be read" when the log's wording is changed.
"""

from __future__ import annotations

import re

import pytest

from cortex.actual import compare_memory, read_engine_report, read_llamacpp_report
from cortex.facts import gguf_facts, hf_dir_facts
from cortex.hardware import Inventory
from cortex.plan import make_plan
from cortex.quant import assign_types, predict_gguf_bytes
from cortex.specfile import parse_spec_text

MiB = 2**20


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M"])
def test_predicted_gguf_size_within_2_percent(quant: str, test_model, smollm2_ggufs) -> None:
    facts = hf_dir_facts(test_model.hf_dir)
    predicted = predict_gguf_bytes(
        facts.tensors, quant, metadata_bytes=facts.metadata_bytes, n_gqa=facts.n_gqa, n_expert=1
    )
    real = smollm2_ggufs[quant].stat().st_size
    assert abs(predicted - real) / real < 0.02, f"{quant}: predicted {predicted:,} vs real {real:,}"


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "Q2_K", "Q3_K_S"])
def test_per_tensor_types_match_llama_quantize(quant: str, test_model, smollm2_ggufs, toolchain, vllm_install) -> None:
    """Not just the total: every tensor gets the type llama-quantize gave it. SmolLM2's rows
    (576 = 2.25 k-blocks) do not fill a k-quant block, so Q2_K and Q3_K_S prove the pinned
    build's fallbacks (Q2_K and Q3_K rows become Q4_0)."""
    from gguf import GGUFReader

    from cache_helpers import smollm2_gguf_files

    facts = hf_dir_facts(test_model.hf_dir)
    predicted = assign_types(facts.tensors, quant, n_gqa=facts.n_gqa)
    files = (
        smollm2_ggufs if quant in smollm2_ggufs else smollm2_gguf_files([quant], toolchain, vllm_install, test_model)
    )
    real = {t.name: t.tensor_type for t in GGUFReader(files[quant]).tensors}
    wrong = {n: (predicted.get(n), t) for n, t in real.items() if n in predicted and predicted[n] != t}
    assert not wrong, f"{len(wrong)} tensors typed differently, e.g. {list(wrong.items())[:5]}"
    assert set(real) <= set(predicted) | {"rope_freqs.weight"}


@pytest.mark.parametrize("quant", ["Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"])
def test_fused_qkv_types_match_llama_quantize(quant: str, toolchain, tmp_path) -> None:
    """A fused attn_qkv (Phi-3's layout), which SmolLM2 does not have: a small random-weight
    phi3 GGUF, quantized by the pinned llama-quantize. It gives attn_qkv attn_v's rule and layer
    counter (category_is_attn_v); every tensor's type must be the one Cortex predicts."""
    import subprocess

    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from cortex.quant import TensorInfo

    n_layer, hidden, ff, vocab = 16, 256, 512, 512
    source = tmp_path / "phi3-f16.gguf"
    w = GGUFWriter(source, "phi3")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_block_count(n_layer)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // 4)
    w.add_file_type(1)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int, dtype: type = np.float16) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(dtype))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden, dtype=np.float32)
    tensor("output.weight", vocab, hidden)
    for i in range(n_layer):
        tensor(f"blk.{i}.attn_norm.weight", hidden, dtype=np.float32)
        tensor(f"blk.{i}.attn_qkv.weight", 3 * hidden, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, dtype=np.float32)
        tensor(f"blk.{i}.ffn_up.weight", 2 * ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / f"phi3-{quant}.gguf"
    done = subprocess.run([str(toolchain.llama_quantize), str(source), str(out), quant], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    tensors = [TensorInfo(t.name, tuple(int(d) for d in t.shape)) for t in GGUFReader(source).tensors]
    predicted = assign_types(tensors, quant, n_gqa=1)
    real = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    wrong = {n: (predicted.get(n), t) for n, t in real.items() if predicted.get(n) != t}
    assert not wrong, f"{len(wrong)} tensors typed differently, e.g. {list(wrong.items())[:5]}"


def test_hf_checkpoint_and_its_gguf_agree_on_facts(test_model, smollm2_ggufs) -> None:
    hf = hf_dir_facts(test_model.hf_dir)
    gg = gguf_facts(smollm2_ggufs["F16"])
    for field in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "tie_embeddings"):
        assert getattr(hf, field) == getattr(gg, field), field
    assert hf.params_total == gg.params_total == 134_515_008


def _reported_kv_mib(log: str) -> float:
    m = re.search(r"llama_kv_cache\w*:\s+size =\s+([\d.]+) MiB", log) or re.search(
        r"KV (?:self )?size\s*=\s*([\d.]+) MiB", log
    )
    assert m, "llama-server did not report a KV cache size:\n" + log[-3000:]
    return float(m.group(1))


@pytest.mark.parametrize("ctx,slots,ctk", [(2048, 1, None), (4096, 2, None), (8192, 4, "q8_0")])
def test_planned_kv_cache_equals_llama_server(
    ctx: int, slots: int, ctk: str | None, test_model, start_llama_server
) -> None:
    extra = f"\n  cache_type_k: {ctk}\n  cache_type_v: {ctk}" if ctk else ""
    spec = parse_spec_text(
        f"name: kv\nsource:\n  gguf: {test_model.gguf}\nllamacpp:\n  context_size: {ctx}\n  parallel: {slots}{extra}\n",
        "kv.yaml",
    )
    facts = gguf_facts(test_model.gguf)
    plan = make_plan(spec, facts, Inventory([], 2, 16 * 2**30))
    planned_mib = plan.devices[0].kv_cache_bytes / MiB
    args = ["-c", str(ctx), "-np", str(slots), "-lv", "4"]  # verbosity 4 logs the KV cache size
    if ctk:
        args += ["-ctk", ctk, "-ctv", ctk]
    server = start_llama_server(test_model.gguf, *args)
    log = server.log()
    reported = _reported_kv_mib(log)
    assert planned_mib == pytest.approx(reported, abs=0.01), f"planned {planned_mib} MiB, llama-server {reported} MiB"

    # cortex.actual reads the same real log: one CPU device, its KV cache as above, its weights
    # (the mmapped model buffer) as planned; the compute and output buffers are the overhead.
    report = read_engine_report("llamacpp", log)
    [cpu] = report.devices
    assert cpu.device == "cpu" and cpu.kv_cache_bytes / MiB == pytest.approx(reported, abs=0.01)
    assert cpu.weights_bytes / MiB == pytest.approx(plan.devices[0].weights_bytes / MiB, abs=0.01)
    assert cpu.overhead_bytes and any("compute buffer size" in line for line in report.lines)
    rows = {r.term: r for r in compare_memory(plan.devices, report).rows}
    assert (
        not rows["weights"].off
        and not rows["kv_cache"].off
        and rows["kv_cache"].deviation == pytest.approx(0, abs=1e-3)
    )
    # the overhead too: the compute and output buffers as planned (once 160 MiB against ~15 MiB)
    assert not rows["overhead"].off, rows["overhead"]
    assert not compare_memory(plan.devices, report).warnings

    # The same log in a wording this reader does not know: a typed "could not read", no exception.
    garbled = read_llamacpp_report(log.replace("model buffer size", "model buffer bytes"))
    assert not garbled.readable and garbled.devices == () and "no `model buffer size` line" in garbled.problem
    [warning] = compare_memory(plan.devices, garbled).warnings
    assert warning.startswith("llama-server's memory report could not be read")
    # One figure's wording changed: the others are still compared, the missing one is named.
    no_kv = compare_memory(plan.devices, read_llamacpp_report(log.replace("KV buffer size", "KV buf")))
    assert any("gave no KV cache figure" in w for w in no_kv.warnings)
    assert {r.term: r.actual_bytes for r in no_kv.rows}["weights"] == cpu.weights_bytes
