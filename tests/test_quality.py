"""The quantization quality check: its teacher-forced top-1 agreement against a fake
llama-server whose 'model' is a known function, then on real SmolLM2 GGUFs."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cortex.quality import (
    QualityCheckError,
    QualityGateFailed,
    check_quant_quality,
    enforce_quality,
)
from test_bench import ServerThread

VOCAB = 50


def ref_next(prefix: list[int]) -> int:
    digest = hashlib.sha256(",".join(map(str, prefix)).encode()).digest()
    return digest[0] % VOCAB


def noisy_next(prefix: list[int], noise: int) -> int:
    """The reference's choice, except at the positions a second hash picks (about noise %)."""
    digest = hashlib.sha256(("n" + ",".join(map(str, prefix))).encode()).digest()
    if digest[1] % 100 < noise:
        return (ref_next(prefix) + 1) % VOCAB
    return ref_next(prefix)


def fake_llama_server(next_token, *, vocab_shift: int = 0, token_delay: float = 0.0):
    """/tokenize and /completion (plain and streamed) of a llama-server whose greedy 'model'
    is `next_token(prefix)`. Counts requests and the tokens it generated."""
    calls = {"completion": 0, "generated": 0}

    async def tokenize(request: Request):
        body = await request.json()
        return JSONResponse({"tokens": [1] + [(ord(c) + vocab_shift) % VOCAB for c in body["content"]]})

    def entry(tok: int) -> dict:
        other = (tok - 1) % VOCAB  # the noisy model's runner-up is the reference's token
        return {
            "id": tok,
            "token": str(tok),
            "logprob": -0.1,
            "top_logprobs": [
                {"id": tok, "token": str(tok), "logprob": -0.1},
                {"id": other, "token": str(other), "logprob": -2.5},
            ],
        }

    async def completion(request: Request):
        body = await request.json()
        calls["completion"] += 1
        prompt = list(body["prompt"])
        if body.get("stream"):

            async def events():
                for _ in range(body["n_predict"]):
                    if token_delay:
                        await asyncio.sleep(token_delay)
                    tok = next_token(prompt)
                    prompt.append(tok)
                    calls["generated"] += 1
                    yield f"data: {json.dumps({'content': str(tok), 'stop': False, 'completion_probabilities': [entry(tok)]})}\n\n"
                yield f"data: {json.dumps({'content': '', 'stop': True})}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        probs = []
        for _ in range(body["n_predict"]):
            tok = next_token(prompt)
            calls["generated"] += 1
            probs.append(entry(tok))
            prompt.append(tok)
        return JSONResponse(
            {
                "content": " ".join(p["token"] for p in probs),
                "tokens": [p["id"] for p in probs],
                "completion_probabilities": probs,
            }
        )

    app = Starlette(
        routes=[Route("/tokenize", tokenize, methods=["POST"]), Route("/completion", completion, methods=["POST"])]
    )
    return app, calls


def teacher_forced_agreement(prompts: list[str], tokens: int, noise: int) -> float:
    """Per-position top-1 agreement computed the slow, obvious way."""
    hits = total = 0
    for text in prompts:
        prefix = [1] + [ord(c) % VOCAB for c in text]
        for _ in range(tokens):
            want = ref_next(prefix)
            hits += noisy_next(prefix, noise) == want
            total += 1
            prefix = prefix + [want]
    return hits / total


def test_rollouts_with_restarts_equal_per_position_teacher_forcing():
    prompts = ["alpha", "beta gamma", "delta", "an apple a day"]
    ref_app, _ = fake_llama_server(ref_next)
    cand_app, calls = fake_llama_server(lambda p: noisy_next(p, 20), token_delay=0.01)
    with ServerThread(ref_app) as ref, ServerThread(cand_app) as cand:
        report = check_quant_quality(ref.base_url, cand.base_url, prompts=prompts, tokens=24, candidate_label="noisy")
    expected = teacher_forced_agreement(prompts, 24, 20)
    assert 0.5 < expected < 0.95
    assert report.top1_agreement == pytest.approx(expected)
    assert report.positions == 4 * 24
    # one rollout per prompt plus at most one per disagreement, far fewer than one per token
    misses = report.positions - report.agreements
    assert misses <= calls["completion"] <= len(prompts) + misses
    # a rollout stops at its first disagreement: about one generated token per position
    rollouts = calls["completion"]
    assert calls["generated"] <= report.positions + 3 * rollouts
    # at a disagreement the reference token is the candidate's second choice: drop 2.4
    assert report.mean_logprob_drop == pytest.approx(2.4 * misses / report.positions)
    assert report.positions_outside_top_k == 0
    assert all(p.first_divergence <= p.positions for p in report.per_prompt)
    assert "top-1 agreement" in report.markdown()


def test_identical_models_agree_fully_and_pass_the_gate():
    app_a, _ = fake_llama_server(ref_next)
    app_b, _ = fake_llama_server(ref_next)
    with ServerThread(app_a) as a, ServerThread(app_b) as b:
        report = check_quant_quality(a.base_url, b.base_url, prompts=3, tokens=10, min_top1_agreement=0.99)
    assert report.top1_agreement == 1.0 and report.identical_continuations == 1.0
    assert report.mean_first_divergence == 10 and report.passed is True
    assert enforce_quality(report) is report


def test_a_failed_quality_gate_raises_with_the_numbers():
    ref_app, _ = fake_llama_server(ref_next)
    cand_app, _ = fake_llama_server(lambda p: noisy_next(p, 50))
    with ServerThread(ref_app) as ref, ServerThread(cand_app) as cand:
        report = check_quant_quality(
            ref.base_url, cand.base_url, prompts=2, tokens=16, min_top1_agreement=0.9, candidate_label="Q2_K"
        )
    assert report.passed is False
    with pytest.raises(QualityGateFailed, match=r"Q2_K agrees with F16 on .*below the minimum 90.0%"):
        enforce_quality(report)


def test_different_vocabularies_are_refused():
    app_a, _ = fake_llama_server(ref_next)
    app_b, _ = fake_llama_server(ref_next, vocab_shift=3)
    with ServerThread(app_a) as a, ServerThread(app_b) as b:
        with pytest.raises(QualityCheckError, match="tokenize the same prompt differently"):
            check_quant_quality(a.base_url, b.base_url, prompts=1, tokens=4)


def test_one_reference_serves_several_candidates():
    from cortex.quality import greedy_reference

    ref_app, ref_calls = fake_llama_server(ref_next)
    a_app, _ = fake_llama_server(lambda p: noisy_next(p, 5))
    b_app, _ = fake_llama_server(lambda p: noisy_next(p, 40))
    with ServerThread(ref_app) as ref, ServerThread(a_app) as a, ServerThread(b_app) as b:
        refs = greedy_reference(ref.base_url, prompts=6, tokens=20)
        good = check_quant_quality(refs, a.base_url, candidate_label="a")
        bad = check_quant_quality(refs, b.base_url, candidate_label="b")
    assert ref_calls["completion"] == 6
    assert good.positions == bad.positions == 120
    assert good.top1_agreement > bad.top1_agreement
