"""The tensor types llama-quantize picks (llama.cpp's llama_tensor_get_type) and the GGUF sizes
that follow, on the tensor lists of real published configs (tests/data/hf_configs).

Fast tier: pure calls. tests/test_plan_vs_llamacpp.py checks the same rules against files the real
llama-quantize writes (parts tier); these pin each rule (layer ranges, thresholds, fallbacks) on
layer counts and shapes the SmolLM2 files do not exercise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter, GGMLQuantizationType as T

from cortex.facts import ModelFacts, facts_from_config
from cortex.quant import (
    TensorInfo,
    assign_types,
    canonical_type,
    predict_gguf_bytes,
    tensor_bytes,
    weights_bytes,
)

CONFIGS = Path(__file__).resolve().parent / "data" / "hf_configs"


def facts(name: str) -> ModelFacts:
    return facts_from_config(json.loads((CONFIGS / f"{name}.json").read_text()), where=name)


def by_layer(types: dict[str, T], kind: str) -> list[T]:
    """The type of `blk.<i>.<kind>.weight` for each layer, in layer order."""
    found = {
        int(n.split(".")[1]): t for n, t in types.items() if n.startswith("blk.") and n.endswith(f".{kind}.weight")
    }
    return [found[i] for i in range(len(found))]


def layers(n: int, more: set[int], hi: T, lo: T) -> list[T]:
    return [hi if i in more else lo for i in range(n)]


# llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between.
GEMMA2_MORE_BITS = {0, 1, 2, 5, 8, 11, 14, 17, 20, 22, 23, 24, 25}  # 26 layers: n/8 = 3, 7n/8 = 22
LLAMA32_MORE_BITS = {0, 1, 4, 7, 10, 13, 14, 15}  # 16 layers
QWEN_MORE_BITS = {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23}  # 24 layers: n/8 = 3, 7n/8 = 21
PHI3_MORE_BITS = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}  # 32 layers: n/8 = 4, 7n/8 = 28


@pytest.mark.parametrize(
    "model,more", [("gemma-2-2b-it", GEMMA2_MORE_BITS), ("Llama-3.2-1B-Instruct", LLAMA32_MORE_BITS)]
)
@pytest.mark.parametrize("quant,base", [("Q4_K_M", T.Q4_K), ("Q5_K_M", T.Q5_K)])
def test_k_m_gives_attn_v_and_ffn_down_six_bits_in_the_first_and_last_eighth_and_every_third_layer(
    model: str, more: set[int], quant: str, base: T
) -> None:
    f = facts(model)
    types = assign_types(f.tensors, quant, n_gqa=f.n_gqa)
    n = f.n_layers
    assert by_layer(types, "attn_v") == layers(n, more, T.Q6_K, base)
    if quant == "Q4_K_M":
        assert by_layer(types, "ffn_down") == layers(n, more, T.Q6_K, base)
    else:
        assert by_layer(types, "ffn_down") == layers(n, more, T.Q6_K, base)
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(by_layer(types, kind)) == {base}, kind


def test_q3_k_m_gives_the_first_two_attn_v_and_the_first_sixteenth_of_ffn_down_five_bits() -> None:
    for model in ("gemma-2-2b-it", "Llama-3.2-1B-Instruct"):  # n/16 = 1 for both
        f = facts(model)
        types = assign_types(f.tensors, "Q3_K_M", n_gqa=f.n_gqa)
        n = f.n_layers
        assert by_layer(types, "attn_v") == layers(n, {0, 1}, T.Q5_K, T.Q4_K), model
        assert by_layer(types, "ffn_down") == layers(n, {0}, T.Q5_K, T.Q4_K), model
        assert set(by_layer(types, "attn_output")) == {T.Q4_K}
        assert set(by_layer(types, "attn_q")) == set(by_layer(types, "ffn_up")) == {T.Q3_K}


def test_q3_k_l_and_q3_k_s() -> None:
    f = facts("Llama-3.2-1B-Instruct")
    large = assign_types(f.tensors, "Q3_K_L", n_gqa=f.n_gqa)
    for kind in ("attn_v", "ffn_down", "attn_output"):
        assert set(by_layer(large, kind)) == {T.Q5_K}, kind
    assert set(by_layer(large, "attn_q")) == {T.Q3_K}
    small = assign_types(f.tensors, "Q3_K_S", n_gqa=f.n_gqa)
    assert {t for n, t in small.items() if n.startswith("blk.") and "norm" not in n} == {T.Q3_K}
    assert small["token_embd.weight"] == T.Q6_K  # tied: it is the output too


def test_q4_k_s_gives_the_first_four_attn_v_and_the_first_eighth_of_ffn_down_five_bits() -> None:
    f = facts("gemma-2-2b-it")  # 26 layers: the first eighth is layers 0-2
    types = assign_types(f.tensors, "Q4_K_S", n_gqa=f.n_gqa)
    assert by_layer(types, "attn_v") == layers(26, {0, 1, 2, 3}, T.Q5_K, T.Q4_K)
    assert by_layer(types, "ffn_down") == layers(26, {0, 1, 2}, T.Q5_K, T.Q4_K)
    assert set(by_layer(types, "attn_output")) == {T.Q4_K}


@pytest.mark.parametrize("quant,base", [("IQ4_XS", T.IQ4_XS), ("IQ4_NL", T.IQ4_NL)])
def test_iq4_gives_ffn_down_five_bits_in_the_first_eighth_and_attn_v_from_four_query_heads_per_kv_head(
    quant: str, base: T
) -> None:
    f = facts("gemma-2-2b-it")
    types = assign_types(f.tensors, quant, n_gqa=f.n_gqa)
    assert by_layer(types, "ffn_down") == layers(26, {0, 1, 2}, T.Q5_K, base)
    assert f.n_gqa == 2 and set(by_layer(types, "attn_v")) == {base}
    assert set(by_layer(assign_types(f.tensors, quant, n_gqa=4), "attn_v")) == {T.Q5_K}
    assert set(by_layer(assign_types(f.tensors, quant, n_gqa=3), "attn_v")) == {base}


def test_q2_k_attn_v_takes_four_bits_from_four_query_heads_per_kv_head() -> None:
    f = facts("Llama-3.2-1B-Instruct")
    assert f.n_gqa == 4
    types = assign_types(f.tensors, "Q2_K", n_gqa=f.n_gqa)
    assert set(by_layer(types, "attn_v")) == {T.Q4_K}
    assert set(by_layer(types, "ffn_down")) == set(by_layer(types, "attn_output")) == {T.Q3_K}
    assert set(by_layer(types, "attn_q")) == {T.Q2_K}
    assert set(by_layer(assign_types(f.tensors, "Q2_K", n_gqa=3), "attn_v")) == {T.Q3_K}
    assert set(by_layer(assign_types(f.tensors, "Q2_K"), "attn_v")) == {T.Q3_K}  # default: no GQA


def test_eight_expert_models_keep_attn_v_and_attn_k_at_8_bits_and_attn_output_at_5() -> None:
    f = facts("Llama-3.2-1B-Instruct")
    for quant in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M"):
        types = assign_types(f.tensors, quant, n_gqa=f.n_gqa, n_expert=8)
        assert set(by_layer(types, "attn_v")) == set(by_layer(types, "attn_k")) == {T.Q8_0}, quant
        assert set(by_layer(types, "attn_output")) == {T.Q5_K}, quant
    other = assign_types(f.tensors, "Q5_K_M", n_gqa=f.n_gqa, n_expert=8)
    assert set(by_layer(other, "attn_output")) == {T.Q5_K} and set(by_layer(other, "attn_k")) == {T.Q8_0}
    nine = assign_types(f.tensors, "Q4_K_M", n_gqa=f.n_gqa, n_expert=9)
    assert set(by_layer(nine, "attn_k")) == set(by_layer(nine, "attn_output")) == {T.Q4_K}
    assert by_layer(nine, "attn_v") == layers(16, LLAMA32_MORE_BITS, T.Q6_K, T.Q4_K)


def test_fused_qkv_and_an_untied_output() -> None:
    """The pinned llama-quant.cpp puts attn_qkv in attn_v's category (category_is_attn_v): it gets
    attn_v's extra bits, by the same layer counter; its own attn_qkv branch never runs."""
    f = facts("Phi-3-mini-4k-instruct")  # attn_qkv kept fused; output.weight of its own; n_gqa 1
    expect = {
        "Q3_K_M": layers(32, {0, 1}, T.Q5_K, T.Q4_K),
        "Q3_K_L": layers(32, set(), T.Q5_K, T.Q5_K),
        "Q4_K_M": layers(32, PHI3_MORE_BITS, T.Q6_K, T.Q4_K),
        "Q5_K_M": layers(32, PHI3_MORE_BITS, T.Q6_K, T.Q5_K),
        "Q4_K_S": layers(32, {0, 1, 2, 3}, T.Q5_K, T.Q4_K),
        "Q2_K": layers(32, set(), T.Q3_K, T.Q3_K),  # n_gqa < 4
    }
    for quant, qkv in expect.items():
        types = assign_types(f.tensors, quant, n_gqa=f.n_gqa)
        assert by_layer(types, "attn_qkv") == qkv, quant
        assert types["output.weight"] == T.Q6_K, quant
        assert types["token_embd.weight"] == GGUF_DEFAULT[quant], quant  # not the output: the file type's own
    q8 = assign_types(f.tensors, "Q8_0")
    assert q8["output.weight"] == q8["token_embd.weight"] == T.Q8_0
    # ne0 3072 fits every block, but 32064 rows do not fill 256: only the row length decides
    assert f.tensors[-1].shape == (3072, 32064)


GGUF_DEFAULT = {
    "Q3_K_M": T.Q3_K,
    "Q3_K_L": T.Q3_K,
    "Q4_K_M": T.Q4_K,
    "Q5_K_M": T.Q5_K,
    "Q4_K_S": T.Q4_K,
    "Q2_K": T.Q2_K,
}


def test_rows_that_do_not_fill_a_k_block_fall_back_as_llama_quantize_does() -> None:
    f = facts("Qwen2.5-0.5B")  # hidden 896: a row of 3.5 k-quant blocks; ffn_down rows 4864 = 19 blocks
    m = assign_types(f.tensors, "Q4_K_M", n_gqa=f.n_gqa)
    assert set(by_layer(m, "attn_q")) == set(by_layer(m, "ffn_up")) == {T.Q5_0}  # Q4_K -> Q5_0
    assert by_layer(m, "attn_v") == layers(24, QWEN_MORE_BITS, T.Q8_0, T.Q5_0)
    assert by_layer(m, "ffn_down") == layers(24, QWEN_MORE_BITS, T.Q6_K, T.Q4_K)
    assert m["token_embd.weight"] == T.Q8_0  # the tied output: its row does not fit Q4_K
    assert set(by_layer(assign_types(f.tensors, "Q5_K_S"), "attn_q")) == {T.Q5_1}
    assert set(by_layer(assign_types(f.tensors, "Q2_K"), "attn_q")) == {T.Q4_0}  # Q2_K -> Q4_0
    assert set(by_layer(assign_types(f.tensors, "Q3_K_S"), "attn_q")) == {T.Q4_0}  # Q3_K -> Q4_0
    assert set(by_layer(assign_types(f.tensors, "IQ4_XS"), "attn_q")) == {T.IQ4_NL}
    # a row that does not fill even a 32-block stays F16
    odd = [TensorInfo("blk.0.attn_q.weight", (100, 64))]
    assert assign_types(odd, "Q4_K_M") == {"blk.0.attn_q.weight": T.F16}
    assert assign_types(odd, "Q4_0")["blk.0.attn_q.weight"] == T.F16


def test_norms_stay_f32_and_the_moe_router_stays_as_the_source_wrote_it() -> None:
    f = facts("DeepSeek-V2-Lite-Chat")
    types = assign_types(f.tensors, "Q4_K_M", n_expert=f.n_experts)
    assert types["blk.1.ffn_gate_inp.weight"] == T.F16
    assert assign_types(f.tensors, "Q4_K_M", source_type=T.BF16)["blk.1.ffn_gate_inp.weight"] == T.BF16
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == T.F32
    assert assign_types(f.tensors, "F16")["blk.1.ffn_gate_inp.weight"] == T.F16
    assert assign_types(f.tensors, "BF16")["blk.1.ffn_down_exps.weight"] == T.BF16
    assert assign_types(f.tensors, "F32")["blk.1.ffn_down_exps.weight"] == T.F32
    # unquantized file types keep every weight at their own type, the head included
    assert assign_types(f.tensors, "BF16")["output.weight"] == T.BF16
    assert assign_types(f.tensors, "F32")["output.weight"] == T.F32
    assert assign_types(f.tensors, "bf16")["blk.0.attn_norm.weight"] == T.F32


def test_moe_ffn_down_bits_follow_the_layer_number_not_the_tensor_count() -> None:
    """DeepSeek-V2-Lite: layer 0 dense, layers 1-26 with routed and shared experts, so 53 ffn_down
    tensors in 27 layers; llama.cpp reads a MoE tensor's layer from its name (layer_info)."""
    f = facts("DeepSeek-V2-Lite-Chat")
    assert f.n_layers == 27 and f.n_experts == 64
    types = assign_types(f.tensors, "Q4_K_M", n_expert=f.n_experts)
    more = {i for i in range(27) if i < 3 or i >= 23 or (i - 3) % 3 == 2}
    # ffn_down_shexp rows (2 x 1408 = 2816) fill 256-blocks; the routed experts' 1408 do not (-> Q8_0 / Q5_0)
    shexp = {int(n.split(".")[1]): t for n, t in types.items() if "ffn_down_shexp" in n}
    assert shexp == {i: T.Q6_K if i in more else T.Q4_K for i in range(1, 27)}
    exps = {int(n.split(".")[1]): t for n, t in types.items() if "ffn_down_exps" in n}
    assert exps == {i: T.Q8_0 if i in more else T.Q5_0 for i in range(1, 27)}


def test_mxfp4_puts_the_experts_in_mxfp4_and_the_rest_in_q8_0() -> None:
    f = facts("gpt-oss-20b")
    types = assign_types(f.tensors, "MXFP4", n_gqa=f.n_gqa, n_expert=f.n_experts)
    assert types["blk.0.ffn_down_exps.weight"] == types["blk.23.ffn_gate_exps.weight"] == T.MXFP4
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_q.weight"] == T.Q8_0
    assert types["output.weight"] == types["token_embd.weight"] == T.Q8_0
    assert types["blk.0.attn_sinks.weight"] == T.F32
    # a bias is never quantized, even the experts' 2-D ones
    q4 = assign_types(f.tensors, "Q4_K_M", n_gqa=f.n_gqa, n_expert=f.n_experts)
    assert q4["blk.0.ffn_gate_exps.bias"] == q4["blk.0.ffn_down_exps.bias"] == T.F16


def test_a_tied_embedding_is_quantized_as_the_output() -> None:
    f = facts("Llama-3.2-1B-Instruct")
    assert "output.weight" not in {t.name for t in f.tensors}
    for quant in ("Q4_K_M", "Q4_0", "Q5_K_S", "Q6_K", "IQ4_XS"):
        assert assign_types(f.tensors, quant)["token_embd.weight"] == T.Q6_K, quant
    assert assign_types(f.tensors, "Q8_0")["token_embd.weight"] == T.Q8_0


def test_gguf_type_names_are_case_insensitive_and_an_unknown_one_lists_the_choices() -> None:
    assert canonical_type("q4_k_m") == "Q4_K_M" and canonical_type("bf16") == "BF16"
    with pytest.raises(ValueError, match="'Q4_K_X' is not a GGUF type; use one of F32, F16, BF16, Q8_0"):
        canonical_type("Q4_K_X")


def test_tensor_bytes_are_whole_blocks() -> None:
    assert tensor_bytes(T.Q4_K, 2560) == 10 * 144
    assert tensor_bytes(T.Q8_0, 96) == 3 * 34 and isinstance(tensor_bytes(T.Q8_0, 96), int)
    assert tensor_bytes(T.F16, 7) == 14


@pytest.mark.parametrize("quant,gqa,experts", [("Q2_K", 4, 1), ("Q4_K_M", 4, 8)])
def test_weights_bytes_sum_the_types_the_options_pick(quant: str, gqa: int, experts: int) -> None:
    f = facts("Llama-3.2-1B-Instruct")
    types = assign_types(f.tensors, quant, n_gqa=gqa, n_expert=experts)
    expect = sum(tensor_bytes(types[t.name], t.elements) for t in f.tensors)
    assert weights_bytes(f.tensors, quant, n_gqa=gqa, n_expert=experts) == expect
    assert weights_bytes(f.tensors, quant) != expect  # the defaults: no GQA, no experts


def test_predicted_gguf_size_is_the_size_gguf_writer_writes(tmp_path: Path) -> None:
    """Tensor infos, 32-byte aligned data: a real GGUF written by gguf-py with the same tensors.
    Sizes that are not multiples of 32 (norms of 36 floats, 7-element rows) exercise the padding."""
    tensors = [TensorInfo("token_embd.weight", (36, 50))]
    for i in range(12):
        tensors += [
            TensorInfo(f"blk.{i}.attn_norm.weight", (36,)),
            TensorInfo(f"blk.{i}.attn_q.weight", (36, 7)),
            TensorInfo(f"blk.{i}.ffn_down.weight", (7, 36)),
        ]
    tensors.append(TensorInfo("output_norm.weight", (36,)))
    types = assign_types(tensors, "F16")

    def write(path: Path, with_tensors: bool) -> int:
        w = GGUFWriter(path, "llama")
        w.add_block_count(12)
        for t in tensors if with_tensors else []:
            dtype = np.float32 if types[t.name] == T.F32 else np.float16
            w.add_tensor(t.name, np.zeros(tuple(reversed(t.shape)), dtype=dtype), raw_dtype=types[t.name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.stat().st_size

    metadata = write(tmp_path / "empty.gguf", False)
    real = write(tmp_path / "model.gguf", True)
    predicted = predict_gguf_bytes(tensors, "F16", metadata_bytes=metadata)
    assert isinstance(predicted, int)
    assert abs(predicted - real) < 32, (predicted, real)  # the one pad after the tensor infos
    data = sum(-(-tensor_bytes(types[t.name], t.elements) // 32) * 32 for t in tensors)
    assert data > sum(tensor_bytes(types[t.name], t.elements) for t in tensors)  # padding did happen


def test_predicted_size_follows_gqa_and_experts() -> None:
    f = facts("Llama-3.2-1B-Instruct")
    plain = predict_gguf_bytes(f.tensors, "Q2_K", metadata_bytes=0)
    gqa = predict_gguf_bytes(f.tensors, "Q2_K", metadata_bytes=0, n_gqa=4)
    moe = predict_gguf_bytes(f.tensors, "Q2_K", metadata_bytes=0, n_gqa=4, n_expert=8)
    assert plain < gqa < moe  # attn_v Q3_K -> Q4_K -> Q8_0
    assert predict_gguf_bytes(f.tensors, "Q2_K", metadata_bytes=1000) == plain + 1000
    assert GGML_QUANT_SIZES[T.Q4_K][0] == 256
