"""Model facts from real config.json files of seven families, with the family's transformers
defaults for what a config leaves out.

The configs in tests/data/hf_configs are the published config.json of each model, copied from
public copies of the Hub files (Llama-3.2-1B-Instruct at commit 4e20de36, Qwen2.5-0.5B at
060db649, gemma-2-2b-it, Phi-3-mini-4k-instruct, gpt-oss-20b; DeepSeek-V2-Lite-Chat as
transformers 5.7 re-saves it, same shapes). Mistral is the repo's own specs/hub copy of
Mistral-7B-Instruct-v0.3.

Parameter counts are the safetensors totals the publishers report, exact:
- Llama-3.2-1B(-Instruct) 1,235,814,400; Qwen2.5-0.5B 494,032,768 (Qwen2-0.5B has the same
  shapes); gemma-2-2b(-it) 2,614,341,888; Phi-3-mini-4k-instruct 3,821,079,552 (keras-hub's
  preset metadata); DeepSeek-V2-Lite(-Chat) 15,706,484,224 (a safetensors header sum);
  gpt-oss-20b 20,914,757,184 (its BF16 layout: embeddings, biases and sinks included);
  Mistral-7B-Instruct-v0.3 7,248,023,552 (v0.1's 7,241,732,096 plus 768 more tokens x 4096 x 2).

Predicted GGUF sizes against published files (GB as the model cards print them, 2 decimals):
- bartowski/Llama-3.2-1B-Instruct-GGUF (llama.cpp b3821): f16 2.48, Q8_0 1.32, Q6_K 1.02,
  Q5_K_M 0.91, Q4_K_M 0.81.
- Phi-3-mini-4k-instruct: Q4_K_M 2.39 and Q5_K_M 2.82 (the SandLogic Phi-3.1-mini-4k table,
  same shapes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cortex.facts import facts_from_config, family_defaults
from cortex.quant import predict_gguf_bytes

CONFIGS = Path(__file__).resolve().parent / "data" / "hf_configs"
SPECS_HUB = Path(__file__).resolve().parent.parent / "specs" / "hub"


def config(name: str) -> dict:
    if name == "Mistral-7B-Instruct-v0.3":
        return json.loads(
            next(SPECS_HUB.glob("models--mistralai--Mistral-7B-Instruct-v0.3/snapshots/*/config.json")).read_text()
        )
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize(
    "name,params",
    [
        ("Llama-3.2-1B-Instruct", 1_235_814_400),
        ("Mistral-7B-Instruct-v0.3", 7_248_023_552),
        ("Qwen2.5-0.5B", 494_032_768),
        ("gemma-2-2b-it", 2_614_341_888),
        ("Phi-3-mini-4k-instruct", 3_821_079_552),
        ("DeepSeek-V2-Lite-Chat", 15_706_484_224),
        ("gpt-oss-20b", 20_914_757_184),
    ],
)
def test_parameter_count_is_exact(name: str, params: int) -> None:
    f = facts_from_config(config(name))
    assert f.params_total == params, f"{name}: {f.params_total:,} != {params:,}"


def test_gemma_ties_its_embeddings_when_the_config_does_not_say() -> None:
    cfg = config("gemma-2-2b-it")
    assert "tie_word_embeddings" not in cfg  # the published config leaves it to the family
    f = facts_from_config(cfg)
    assert f.tie_embeddings and not any(t.name == "output.weight" for t in f.tensors)
    embedding = 256_000 * 2304
    assert f.params_total == 2_614_341_888  # the embedding counted once
    # an unknown family keeps the generic rule (untied): the same shapes count the embedding twice
    generic = facts_from_config({**cfg, "model_type": "not-a-family", "architectures": ["NotAFamilyForCausalLM"]})
    assert not generic.tie_embeddings
    assert generic.params_total - f.params_total == embedding - 2 * 26 * 2304  # + output, - the post-norms
    q8_tied = predict_gguf_bytes(f.tensors, "Q8_0", metadata_bytes=0, n_gqa=f.n_gqa)
    q8_generic = predict_gguf_bytes(generic.tensors, "Q8_0", metadata_bytes=0, n_gqa=generic.n_gqa)
    assert q8_generic - q8_tied > embedding  # the double count the family default removes


def test_removing_tie_word_embeddings_from_gemma_2_still_counts_it_once() -> None:
    cfg = {k: v for k, v in config("gemma-2-2b-it").items() if k != "tie_word_embeddings"}
    cfg_said = {**cfg, "tie_word_embeddings": True}
    assert facts_from_config(cfg).params_total == facts_from_config(cfg_said).params_total == 2_614_341_888
    untied = facts_from_config({**cfg, "tie_word_embeddings": False})  # what the config says wins
    assert untied.params_total == 2_614_341_888 + 256_000 * 2304


def test_a_field_set_to_null_is_not_replaced_by_the_family_default() -> None:
    """DeepSeek-V2's class default q_lora_rank is 1536; the Lite config sets null (no q LoRA)."""
    cfg = config("DeepSeek-V2-Lite-Chat")
    assert cfg["q_lora_rank"] is None and family_defaults()["deepseek_v2"]["config"]["q_lora_rank"] == 1536
    f = facts_from_config(cfg)
    assert not any("attn_q_a" in t.name for t in f.tensors)
    without = {k: v for k, v in cfg.items() if k != "q_lora_rank"}  # left out: the family default applies
    assert any(
        t.name == "blk.0.attn_q_a.weight" and t.shape == (2048, 1536) for t in facts_from_config(without).tensors
    )


def test_family_defaults_fill_what_the_config_leaves_out() -> None:
    mistral = facts_from_config({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000})
    assert (mistral.hidden_size, mistral.n_layers, mistral.n_kv_heads, mistral.intermediate_size) == (
        4096,
        32,
        8,
        14336,
    )
    assert mistral.sliding_window == 4096 and mistral.max_context == 131072
    unknown = facts_from_config(
        {
            "architectures": ["XForCausalLM"],
            "model_type": "x",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 32000,
        }
    )
    assert unknown.n_kv_heads == 32 and unknown.sliding_window is None and unknown.max_context == 2048
    assert unknown.intermediate_size is None and any(
        t.name == "blk.0.ffn_up.weight" and t.shape == (4096, 4 * 4096) for t in unknown.tensors
    )


def test_sliding_layers_follow_the_family_rule() -> None:
    assert facts_from_config(config("gemma-2-2b-it")).sliding_layers == 13  # every other layer
    assert facts_from_config(config("gpt-oss-20b")).sliding_layers == 12
    assert facts_from_config(config("Qwen2.5-0.5B")).sliding_window is None  # use_sliding_window: false
    qwen_sliding = facts_from_config({**config("Qwen2.5-0.5B"), "use_sliding_window": True, "max_window_layers": 20})
    assert (qwen_sliding.sliding_window, qwen_sliding.sliding_layers) == (32768, 4)  # layers 20..23


def test_family_layouts_name_the_tensors_the_converter_writes() -> None:
    names = {t.name: t.shape for t in facts_from_config(config("Qwen2.5-0.5B")).tensors}
    assert names["blk.0.attn_q.bias"] == (896,) and names["blk.0.attn_k.bias"] == (128,)
    assert "blk.0.attn_output.bias" not in names
    names = {t.name: t.shape for t in facts_from_config(config("Phi-3-mini-4k-instruct")).tensors}
    assert names["blk.0.attn_qkv.weight"] == (3072, 9216) and names["blk.0.ffn_up.weight"] == (3072, 16384)
    assert "blk.0.ffn_gate.weight" not in names
    names = {t.name: t.shape for t in facts_from_config(config("gemma-2-2b-it")).tensors}
    assert names["blk.0.post_attention_norm.weight"] == names["blk.0.post_ffw_norm.weight"] == (2304,)
    names = {t.name: t.shape for t in facts_from_config(config("gpt-oss-20b")).tensors}
    assert names["blk.0.attn_sinks.weight"] == (64,) and names["blk.0.ffn_down_exps.bias"] == (2880, 32)
    names = {t.name: t.shape for t in facts_from_config(config("DeepSeek-V2-Lite-Chat")).tensors}
    assert names["blk.1.attn_k_b.weight"] == (128, 512, 16) and names["blk.1.attn_v_b.weight"] == (512, 128, 16)


GB = 1e9


@pytest.mark.parametrize(
    "name,quant,published_gb",
    [
        ("Llama-3.2-1B-Instruct", "F16", 2.48),
        ("Llama-3.2-1B-Instruct", "Q8_0", 1.32),
        ("Llama-3.2-1B-Instruct", "Q6_K", 1.02),
        ("Llama-3.2-1B-Instruct", "Q5_K_M", 0.91),
        ("Llama-3.2-1B-Instruct", "Q4_K_M", 0.81),
        ("Phi-3-mini-4k-instruct", "Q4_K_M", 2.39),
        # Not Phi-3's published Q5_K_M (2.82 GB): it was made by an older llama.cpp whose own
        # attn_qkv branch gave every layer's qkv Q6_K; the pinned build gives qkv attn_v's rule
        # (Q6_K in the "more bits" layers only), 2.755 GB, which test_plan_vs_llamacpp.py's
        # test_fused_qkv_types_match_llama_quantize checks against the real llama-quantize.
    ],
)
def test_predicted_gguf_size_matches_the_published_file(name: str, quant: str, published_gb: float) -> None:
    f = facts_from_config(config(name))
    predicted = predict_gguf_bytes(f.tensors, quant, metadata_bytes=f.metadata_bytes or 0, n_gqa=f.n_gqa)
    # the card rounds to 0.01 GB: allow that rounding plus 1% for metadata the config cannot see
    assert abs(predicted / GB - published_gb) <= 0.005 + 0.01 * published_gb, f"{name} {quant}: {predicted / GB:.3f} GB"
