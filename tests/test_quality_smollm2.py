"""The quality check on real GGUFs: SmolLM2 at Q8_0 and Q4_K_M against its F16 conversion,
each served by its own llama-server."""

from __future__ import annotations

from cortex.quality import check_quant_quality, greedy_reference


def test_lower_quant_agrees_less_with_f16(smollm2_ggufs, start_llama_server):
    f16 = start_llama_server(smollm2_ggufs["F16"], "-np", "1")
    q8 = start_llama_server(smollm2_ggufs["Q8_0"], "-np", "1")
    q4 = start_llama_server(smollm2_ggufs["Q4_K_M"], "-np", "1")

    same = check_quant_quality(f16.base_url, f16.base_url, prompts=2, tokens=12, api_key=f16.api_key)
    assert same.top1_agreement == 1.0, "greedy decoding of one server must be deterministic"

    reference = greedy_reference(f16.base_url, prompts=16, tokens=32, api_key=f16.api_key)
    reports = {}
    for label, server in (("Q8_0", q8), ("Q4_K_M", q4)):
        reports[label] = check_quant_quality(
            reference,
            server.base_url,
            candidate_label=label,
            api_key=server.api_key,
            min_top1_agreement=0.5,
        )
        print(reports[label].markdown())
    q8r, q4r = reports["Q8_0"], reports["Q4_K_M"]
    assert q8r.positions == q4r.positions == 16 * 32
    assert q8r.top1_agreement > q4r.top1_agreement
    assert q8r.top1_agreement >= 0.9
    assert q8r.passed and q4r.passed
    assert q8r.mean_logprob_drop is not None and q4r.mean_logprob_drop is not None
    assert q8r.mean_logprob_drop < q4r.mean_logprob_drop
