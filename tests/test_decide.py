"""The decision rules are data: the trace explains every rule, and editing the data changes the choice."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import pytest

from cortex.decide import DecisionError, DecisionInput, decide, describe_fit, load_rules, vllm_architectures
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


# --- what each rule means, at its edges ---------------------------------------------------

RULES = Path(__file__).resolve().parent.parent / "cortex/data/decision-rules.yaml"


def fresh_rules(tmp_path: Path, text: str | None = None, name: str = "rules.yaml") -> list:
    """The rules read from a file of their own (parsed rules are cached per file)."""
    file = tmp_path / name
    file.write_text(RULES.read_text() if text is None else text)
    return load_rules(file)


def mentioned(why_not: str) -> list[str]:
    return re.findall(r"rule (\S+) ", why_not)


def test_twenty_simultaneous_requests_is_high_concurrency(tmp_path: Path) -> None:
    rules = fresh_rules(tmp_path)
    assert decided(decide(inputs(concurrency=20, fits=False), rules=rules)) == "high-concurrency"
    assert decided(decide(inputs(concurrency=19, fits=False), rules=rules)) == "vram-for-16bit"
    reason = {
        c: next(r for r in decide(inputs(concurrency=c), rules=rules).trace if r.rule == "high-concurrency").reason
        for c in (19, 20, 21)
    }
    assert "20 (>= 20)" in reason[20] and "21 (>= 20)" in reason[21] and "19 (< 20)" in reason[19]


def test_a_gguf_source_counts_as_an_architecture_vllm_cannot_load(tmp_path: Path) -> None:
    # without the gguf-only rule, the architecture rule must still send a GGUF source to llama.cpp
    text = RULES.read_text()
    rules = fresh_rules(
        tmp_path, text[: text.index("  - id: gguf-only")] + text[text.index("  - id: vllm-architecture") :]
    )
    d = decide(inputs(gguf=True), rules=rules)
    assert d.engine == "llamacpp" and decided(d) == "vllm-architecture"
    supported = decide(inputs(), rules=rules)
    arch = next(r for r in supported.trace if r.rule == "vllm-architecture")
    assert not arch.matched and "LlamaForCausalLM is in vLLM 0.32.0's model registry" in arch.reason


def test_the_trace_says_which_rules_matched_with_their_questions_and_policies(tmp_path: Path) -> None:
    rules = fresh_rules(tmp_path)
    d = decide(inputs(concurrency=4, fits=False), rules=rules)
    assert [(r.rule, r.matched, r.decided, r.engine) for r in d.trace] == [
        ("gpt-oss", False, False, "llamacpp"),
        ("gguf-only", False, False, "llamacpp"),
        ("vllm-architecture", False, False, "llamacpp"),
        ("high-concurrency", False, False, "vllm"),
        ("vram-for-16bit", True, True, "llamacpp"),
        ("default", True, False, "vllm"),
    ]
    assert [r.question for r in d.trace] == [r.question for r in rules]
    assert d.trace[0].question == "Is it GPT-OSS 20B/120B (Harmony)?"
    assert "0.10.1" in (d.trace[0].policy or "") and all(r.policy is None for r in d.trace[1:])
    assert d.trace[4].reason == "stated by the test" and not d.pinned


def test_a_rule_without_a_question_asks_its_id(tmp_path: Path) -> None:
    rules = fresh_rules(
        tmp_path, "rules:\n  - id: only\n    question: Anything?\n    then: vllm\n  - id: last\n    then: llamacpp\n"
    )
    assert [(r.id, r.question, r.policy) for r in rules] == [("only", "Anything?", None), ("last", "last", None)]


def test_why_not_names_the_other_engines_rules_that_did_not_match_or_came_later(tmp_path: Path) -> None:
    rules = fresh_rules(tmp_path)
    # llama.cpp by memory: vLLM's earlier rule did not match, its default would have, later
    d = decide(inputs(concurrency=4, fits=False), rules=rules)
    assert d.why_not.startswith("vLLM was not chosen: rule vram-for-16bit decided first (stated by the test)")
    assert mentioned(d.why_not) == ["vram-for-16bit", "high-concurrency", "default"]
    assert "rule high-concurrency did not match (resources.concurrency is 4 (< 20))" in d.why_not
    assert "rule default would have matched but comes later" in d.why_not
    # vLLM by concurrency: llama.cpp's earlier rules did not match, its memory rule matched later
    d = decide(inputs(concurrency=25, fits=False), rules=rules)
    assert d.why_not.startswith("llama.cpp was not chosen: rule high-concurrency decided first")
    assert mentioned(d.why_not) == ["high-concurrency", "gpt-oss", "gguf-only", "vllm-architecture", "vram-for-16bit"]
    # vLLM by default: nothing of llama.cpp's matched later
    d = decide(inputs(concurrency=25), rules=rules)
    assert "would have matched" not in d.why_not


def test_a_pinned_engine_keeps_the_trace_and_names_the_deciding_rule_only_when_it_disagrees(tmp_path: Path) -> None:
    rules = fresh_rules(tmp_path)
    d = decide(inputs(concurrency=4, fits=False), pinned="vllm", rules=rules)
    assert (d.engine, d.pinned) == ("vllm", True) and len(d.trace) == len(rules)
    assert d.why_not.endswith("the rules alone would pick llama.cpp (rule vram-for-16bit)")
    d = decide(inputs(), pinned="vllm", rules=rules)
    assert d.why_not.endswith("the rules alone would pick vLLM") and "(rule" not in d.why_not
    d = decide(inputs(concurrency=4, fits=False), pinned="auto", rules=rules)
    assert (d.engine, d.pinned) == ("llamacpp", False)


def test_a_decision_as_json_has_the_engine_the_trace_and_why_not(tmp_path: Path) -> None:
    d = decide(inputs(concurrency=4, fits=False), rules=fresh_rules(tmp_path))
    out = json.loads(json.dumps(d.to_json()))
    assert set(out) == {"engine", "pinned", "trace", "why_not"}
    assert (out["engine"], out["pinned"], out["why_not"]) == ("llamacpp", False, d.why_not)
    assert out["trace"][4] == {
        "rule": "vram-for-16bit",
        "question": "Is there enough GPU memory for FP16/BF16?",
        "matched": True,
        "reason": "stated by the test",
        "engine": "llamacpp",
        "decided": True,
        "policy": None,
    }
    assert len(out["trace"]) == 6


def test_describe_fit_adds_weights_kv_and_overhead_and_fits_up_to_the_capacity() -> None:
    gib = 1 << 30
    text = describe_fit(10 * gib, 3 * gib, 1 * gib, 14 * gib)
    assert text.startswith("FP16/BF16 needs 14.00 GiB (weights 10.00 GiB + KV 3.00 GiB + overhead 1.00 GiB)")
    assert text.endswith("against 14.00 GiB of GPU memory: fits")
    assert describe_fit(10 * gib, 3 * gib, 1 * gib + 1, 14 * gib).endswith(": does not fit")
    assert describe_fit(10 * gib, 5 * gib, 1 * gib, 15 * gib).endswith(": does not fit")


def test_rule_files_with_the_same_size_and_time_are_told_apart(tmp_path: Path) -> None:
    a = "rules:\n  - id: aaaa\n    then: vllm\n"
    b = "rules:\n  - id: bbbb\n    then: vllm\n"
    assert len(a) == len(b)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    fa, fb = tmp_path / "one/rules.yaml", tmp_path / "two/rules.yaml"
    fa.write_text(a)
    fb.write_text(b)
    os.utime(fa, ns=(1_700_000_000_000_000_000,) * 2)
    os.utime(fb, ns=(1_700_000_000_000_000_000,) * 2)
    assert [r.id for r in load_rules(fa)] == ["aaaa"] and [r.id for r in load_rules(fb)] == ["bbbb"]
    # an edit is read again; the list handed out is the caller's to change
    fa.write_text(a.replace("aaaa", "cccc"))
    rules = load_rules(fa)
    assert [r.id for r in rules] == ["cccc"]
    rules.clear()
    assert [r.id for r in load_rules(fa)] == ["cccc"]


def test_rules_packaged_in_a_zip_are_read(tmp_path: Path) -> None:
    # a zip import hands importlib.resources a zipfile.Path, which has no mtime to cache on
    archive = tmp_path / "cortex.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("cortex/data/decision-rules.yaml", RULES.read_text())
    rules = load_rules(zipfile.Path(archive, "cortex/data/decision-rules.yaml"))  # type: ignore[arg-type]
    assert [r.id for r in rules] == [r.id for r in fresh_rules(tmp_path)]


@pytest.mark.parametrize(
    "rules, message",
    [
        ("rules: [", "not valid YAML"),
        ("", "expected a mapping with a `rules` list"),
        ("rules: {id: x}", "expected a mapping with a `rules` list"),
        ("rules: []", "must end with a default rule"),
        ("rules:\n  - just a string\n", "decision rule 1: expected a mapping"),
        ("rules:\n  - then: vllm\n", "decision rule 1: `id` must be a non-empty string"),
        ("rules:\n  - {id: '', then: vllm}\n", "decision rule 1: `id` must be a non-empty string"),
        ("rules:\n  - {id: 5, then: vllm}\n", "decision rule 1: `id` must be a non-empty string"),
        (
            "rules:\n  - {id: a, then: vllm}\n  - {id: a, then: vllm}\n",
            r"decision rule 2 \(a\): another rule has this id",
        ),
        ("rules:\n  - {id: a, if: [fits_16bit], then: vllm}\n", r"decision rule 1 \(a\): `if` must be a mapping"),
        (
            "rules:\n  - {id: a, if: {fits_16bit: false}, then: vllm}\n  - {id: b, if: {}, then: gpu}\n",
            r"decision rule 2 \(b\): `then` must be one of vllm, llamacpp",
        ),
        ("rules:\n  - {id: a, if: {fits_16bit: false}, then: llamacpp}\n", "must end with a default rule"),
        (
            "rules:\n  - {id: a, if: {concurrency_at_least: twenty}, then: vllm}\n",
            "concurrency_at_least takes a whole number of requests, at least 1, got 'twenty'",
        ),
        ("rules:\n  - {id: a, if: {concurrency_at_least: 0}, then: vllm}\n", "concurrency_at_least takes"),
        ("rules:\n  - {id: a, if: {concurrency_at_least: true}, then: vllm}\n", "concurrency_at_least takes"),
        ("rules:\n  - {id: a, if: {fits_16bit: 'no'}, then: vllm}\n", "fits_16bit takes true or false, got 'no'"),
        (
            "rules:\n  - {id: a, if: {vllm_supports_architecture: 1}, then: vllm}\n",
            "vllm_supports_architecture takes true or false",
        ),
        ("rules:\n  - {id: a, if: {source_format: safetensors}, then: vllm}\n", "source_format takes hf or gguf"),
        (
            "rules:\n  - {id: a, if: {architecture_in: LlamaForCausalLM}, then: vllm}\n",
            "architecture_in takes a list of architecture names",
        ),
        ("rules:\n  - {id: a, if: {architecture_in: []}, then: vllm}\n", "architecture_in takes"),
        ("rules:\n  - {id: a, if: {architecture_in: [1]}, then: vllm}\n", "architecture_in takes"),
        ("rules:\n  - {id: a, if: {architecture_in: [X, '']}, then: vllm}\n", "architecture_in takes"),
    ],
)
def test_a_broken_rules_file_is_refused_with_where_and_what(tmp_path: Path, rules: str, message: str) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text(rules)
    with pytest.raises(DecisionError, match=message) as caught:
        load_rules(file)
    assert str(caught.value).startswith(f"{file}: ")


def test_every_condition_checks_its_argument_and_accepts_the_shipped_ones(tmp_path: Path) -> None:
    from cortex.decide import ARGUMENTS, CONDITIONS

    assert set(ARGUMENTS) == set(CONDITIONS)
    good = (
        "rules:\n  - id: a\n    if: {architecture_in: [X], source_format: hf, vllm_supports_architecture: true,"
        " concurrency_at_least: 1, fits_16bit: true}\n    then: vllm\n  - {id: d, then: llamacpp}\n"
    )
    assert [r.id for r in fresh_rules(tmp_path, good, "good.yaml")] == ["a", "d"]
    assert decided(decide(inputs(), rules=fresh_rules(tmp_path, good, "good.yaml"))) == "d"
