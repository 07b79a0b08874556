"""The decision rules are data: the trace explains every rule, and editing the data changes the choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.decide import DecisionError, DecisionInput, decide, load_rules, vllm_architectures
from cortex.facts import facts_from_config

LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_hidden_layers=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    torch_dtype="bfloat16",
)


def inputs(config=LLAMA, *, concurrency=4, fits=True, gguf=False) -> DecisionInput:
    facts = facts_from_config(config)
    if gguf:
        facts.source_format = "gguf"
    return DecisionInput(facts, concurrency, "0.32.0", vllm_architectures("0.32.0"), fits, "stated by the test")


def decided(d) -> str:
    return next(r.rule for r in d.trace if r.decided)


def test_every_rule_is_in_the_trace_with_a_reason() -> None:
    d = decide(inputs())
    assert [r.rule for r in d.trace] == [r.id for r in load_rules()]
    assert all(r.reason for r in d.trace)
    assert d.engine == "vllm" and decided(d) == "default"
    assert "llama.cpp was not chosen" in d.why_not


def test_seed_order() -> None:
    assert decide(inputs(dict(LLAMA, architectures=["GptOssForCausalLM"], model_type="gpt_oss"))).engine == "llamacpp"
    assert decided(decide(inputs(gguf=True))) == "gguf-only"
    unknown = dict(LLAMA, architectures=["MyOwnExperimentalForCausalLM"], model_type="mine")
    d = decide(inputs(unknown))
    assert d.engine == "llamacpp" and decided(d) == "vllm-architecture"
    assert "not in vLLM 0.32.0's model registry" in next(r for r in d.trace if r.decided).reason
    # high concurrency comes before the memory check
    d = decide(inputs(concurrency=25, fits=False))
    assert d.engine == "vllm" and decided(d) == "high-concurrency"
    d = decide(inputs(concurrency=4, fits=False))
    assert d.engine == "llamacpp" and decided(d) == "vram-for-16bit"


def test_gpt_oss_rule_says_it_is_policy() -> None:
    d = decide(inputs(dict(LLAMA, architectures=["GptOssForCausalLM"], model_type="gpt_oss")))
    rule = next(r for r in d.trace if r.decided)
    assert rule.rule == "gpt-oss" and "policy" in rule.policy.lower() and "0.10.1" in rule.policy
    assert "GptOssForCausalLM" in vllm_architectures("0.32.0")  # vLLM could serve it: the rule is a choice


def test_pinned_engine_is_reported_with_what_the_rules_would_pick() -> None:
    d = decide(inputs(concurrency=4, fits=False), pinned="vllm")
    assert d.engine == "vllm" and d.pinned
    assert "pinned" in d.why_not and "llama.cpp" in d.why_not


def test_an_operator_can_change_a_rule_without_code(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "cortex/data/decision-rules.yaml").read_text()
    # drop the GPT-OSS policy rule: gpt-oss now goes to vLLM when it fits
    start = text.index("  - id: gpt-oss")
    end = text.index("  - id: gguf-only")
    edited = tmp_path / "rules.yaml"
    edited.write_text(text[:start] + text[end:])
    oss = dict(LLAMA, architectures=["GptOssForCausalLM"], model_type="gpt_oss")
    assert decide(inputs(oss), rules=load_rules(edited)).engine == "vllm"
    # a stricter concurrency threshold is a number in the data
    edited.write_text(text.replace("concurrency_at_least: 20", "concurrency_at_least: 2"))
    assert decided(decide(inputs(concurrency=3, fits=False), rules=load_rules(edited))) == "high-concurrency"


def test_bad_rules_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text(
        "rules:\n  - id: x\n    if: {moon_phase: full}\n    then: vllm\n  - id: d\n    if: {}\n    then: vllm\n"
    )
    with pytest.raises(DecisionError, match="unknown condition moon_phase"):
        load_rules(bad)
    bad.write_text("rules:\n  - id: x\n    if: {source_format: gguf}\n    then: llamacpp\n")
    with pytest.raises(DecisionError, match="default rule"):
        load_rules(bad)


def test_architecture_list_matches_installed_vllm(vllm_install) -> None:
    from cortex.engines.registry import live_vllm_architectures

    live = set(live_vllm_architectures(vllm_install.python))
    assert live == set(vllm_architectures(vllm_install.version)), (
        "stale: run cortex.engines.registry.write_vllm_architectures"
    )
