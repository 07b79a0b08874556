"""Model facts from config.json, GGUF files and GGUF headers; GQA, MoE, sliding window, MLA, tied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

from cortex.facts import facts_from_config, gguf_facts, gguf_header_facts, gguf_split_set, hf_dir_facts

DEEPSEEK_V2_LITE = dict(  # MLA + MoE with shared experts (deepseek-ai/DeepSeek-V2-Lite config.json)
    architectures=["DeepseekV2ForCausalLM"],
    model_type="deepseek_v2",
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_hidden_layers=27,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    vocab_size=102400,
    max_position_embeddings=163840,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)


def test_gguf_file_facts(test_model) -> None:
    f = gguf_facts(test_model.gguf)
    assert f.source_format == "gguf" and f.architecture == "llama" and f.dtype == "Q4_1"
    assert (f.n_layers, f.hidden_size, f.n_heads, f.n_kv_heads, f.head_dim) == (30, 576, 9, 3, 64)
    assert f.n_gqa == 3 and f.tie_embeddings and f.params_total == 134_515_008
    assert f.weights_bytes_on_disk + f.metadata_bytes == test_model.gguf.stat().st_size


def test_header_alone_gives_the_same_facts(test_model, tmp_path: Path) -> None:
    full = gguf_facts(test_model.gguf)
    head = tmp_path / "x.gguf.header"
    head.write_bytes(test_model.gguf.read_bytes()[: full.metadata_bytes])
    f = gguf_header_facts(head, "x.gguf")
    for field in (
        "params_total",
        "n_layers",
        "n_kv_heads",
        "head_dim",
        "dtype",
        "weights_bytes_on_disk",
        "max_context",
    ):
        assert getattr(f, field) == getattr(full, field), field


def test_hf_folder_facts_from_safetensors(test_model) -> None:
    f = hf_dir_facts(test_model.hf_dir)
    assert f.architecture == "LlamaForCausalLM" and f.params_total == 134_515_008
    assert f.weights_bytes_on_disk and f.tie_embeddings


def test_config_alone_is_enough(tmp_path: Path, test_model) -> None:
    (tmp_path / "config.json").write_text((test_model.hf_dir / "config.json").read_text())
    f = hf_dir_facts(tmp_path)
    assert f.params_total == 134_515_008 and f.weights_bytes_on_disk is None


def test_moe_and_mla() -> None:
    f = facts_from_config(DEEPSEEK_V2_LITE)
    assert f.is_moe and f.n_experts == 64 and f.n_experts_active == 6
    assert f.is_mla and f.mla_kv_lora_rank == 512
    assert 15.0e9 < f.params_total < 16.5e9  # DeepSeek-V2-Lite: 15.7B total
    assert 2.0e9 < f.params_active < 3.0e9  # 2.4B active
    # MLA caches one latent (512 + 64 rope dims) per token and layer, not K and V per head
    assert f.kv_cache_bytes(1000, 2.0) == 27 * 1000 * (512 + 64) * 2


def test_sliding_window_layers_hold_at_most_the_window() -> None:
    cfg = dict(
        architectures=["GptOssForCausalLM"],
        model_type="gpt_oss",
        hidden_size=2880,
        intermediate_size=2880,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=36,
        num_local_experts=32,
        num_experts_per_tok=4,
        vocab_size=201088,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 18,
        max_position_embeddings=131072,
    )
    f = facts_from_config(cfg)
    assert f.sliding_layers == 18
    per = 2 * 8 * 64 * 2
    assert f.kv_cache_bytes(8192, 2.0) == 18 * 8192 * per + 18 * 128 * per


def test_split_gguf_set(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        (tmp_path / f"big-0000{i}-of-00003.gguf").write_bytes(b"x")
    parts = gguf_split_set(tmp_path / "big-00001-of-00003.gguf")
    assert [p.name for p in parts] == [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    (tmp_path / "big-00002-of-00003.gguf").unlink()
    import pytest

    from cortex.facts import FactsError

    with pytest.raises(FactsError, match="missing big-00002-of-00003.gguf"):
        gguf_split_set(tmp_path / "big-00001-of-00003.gguf")


def test_no_config_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    from cortex.facts import FactsError

    with pytest.raises(FactsError, match="no config.json"):
        hf_dir_facts(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(FactsError, match="architectures"):
        hf_dir_facts(tmp_path)


def test_gguf_in_a_hub_repo_reads_only_the_header(test_model, tmp_path: Path, monkeypatch) -> None:
    """The real huggingface_hub URL builder and token headers, against a local Hub endpoint
    (HF_ENDPOINT): facts come from a ranged read of the first megabytes, not the 98 MB file."""
    from cortex.facts import gguf_repo_facts
    from hubserver import HubRepo, HubServer

    repo = HubRepo("community/smol-gguf")
    sha = repo.commit({"smol.Q4_1.gguf": test_model.gguf})
    with HubServer([repo]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("CORTEX_CACHE", str(tmp_path))
        f = gguf_repo_facts("community/smol-gguf", "smol.Q4_1.gguf", sha)
        sent = sum(r.bytes_sent for r in hub.gets_of("smol.Q4_1.gguf"))
    full = gguf_facts(test_model.gguf)
    assert f.params_total == full.params_total and f.dtype == "Q4_1"
    assert sent < 8 * 2**20 < test_model.gguf.stat().st_size
    assert (tmp_path / "gguf-headers" / "community/smol-gguf" / sha / "smol.Q4_1.gguf.header").is_file()
