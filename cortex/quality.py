"""Quantization quality: how often a quantized GGUF picks the same next token as its F16 reference.

Both models run in llama-server (any version with the native `/completion` and `/tokenize`
endpoints). For each prompt of a fixed bundled set, the reference generates a greedy
continuation of `tokens` tokens. The candidate is then scored teacher-forced along that
continuation: at every position, given the prompt plus the reference's tokens so far, is the
candidate's top-1 token the reference's token?

llama-server returns no prompt logprobs, so teacher forcing is done with greedy rollouts that
restart after each disagreement: the candidate continues greedily (streamed) from the prompt
plus the reference prefix; the run of agreeing tokens counts as agreements, the first
disagreement as one miss, and the stream is dropped there (llama-server stops generating when
the client goes away); the next rollout starts from the reference prefix one token further.
That is exactly per-position top-1 agreement, at one request per disagreement instead of one
per token, and about one generated token per position.

The reference's continuations do not depend on the candidate: `greedy_reference` computes
them once, and several quantizations can be checked against the same reference. The reference
can also be vLLM serving the HF checkpoint (`engine="vllm"`: its `/tokenize` and greedy
`/v1/completions` with token ids and log-probabilities): that is the cross-engine agreement of
`cortex compare-engines`, the same measure with the full-precision model on the other engine.

With `n_probs` the server also reports log-probabilities (before sampling), so the report
gives the mean log-probability the candidate loses on the reference's tokens.

Reported: top-1 agreement over all positions, the share of continuations that are identical,
and the mean position of the first disagreement. When the spec sets a KL-divergence gate, the
report also carries llama.cpp's own measure of the same quant (`cortex.kld`), and its gates.
"""

from __future__ import annotations

import json
from typing import Any, Generator, Sequence

import httpx
from pydantic import BaseModel, Field

from cortex.bench import bundled_prompts
from cortex.kld import KldReport
from cortex.spec import QualityCheck
from cortex.sse import DONE, iter_sse_data

TOP_K_PROBS = 5
QUALITY_DEFAULTS = QualityCheck()  # prompts and tokens per prompt, as a spec's `quality` has them


class QualityCheckError(RuntimeError):
    """The quality check could not run (server unreachable, vocabularies differ, bad answer)."""


class QualityGateFailed(RuntimeError):
    """A quality gate of the spec is not met: top-1 agreement under `min_top1_agreement`, mean
    KL-divergence over `max_kld`, or same top p under `min_same_top_p`."""

    def __init__(self, report: "QualityReport", failures: list[str]):
        self.report = report
        self.failures = failures
        self.minimum = report.min_top1_agreement
        super().__init__(f"quantization quality gate failed: {'; '.join(failures)}")


class PromptAgreement(BaseModel):
    prompt: str
    positions: int
    agreements: int
    first_divergence: int = Field(description="index of the first disagreement; = positions if none")
    reference_text: str
    candidate_text: str = Field(description="the candidate's own greedy continuation, up to its first disagreement")


class QualityReport(BaseModel):
    reference_label: str
    candidate_label: str
    prompts: int
    tokens_per_prompt: int
    positions: int
    agreements: int
    top1_agreement: float
    identical_continuations: float = Field(description="share of prompts whose greedy continuations match fully")
    mean_first_divergence: float
    mean_logprob_drop: float | None = Field(
        None,
        description="mean (reference - candidate) log-probability of the reference's token, "
        "over positions where the candidate ranks it in its top 5",
    )
    positions_outside_top_k: int = 0
    requests: int = 0
    min_top1_agreement: float | None = None
    passed: bool | None = None
    per_prompt: list[PromptAgreement] = Field(default_factory=list)
    kld: KldReport | None = Field(None, description="llama-perplexity's KL-divergence, when a gate asks for it")

    def gate_failures(self) -> list[str]:
        """Each gate not met, with the measured number and the bound."""
        out = []
        if self.min_top1_agreement is not None and self.top1_agreement < self.min_top1_agreement:
            out.append(
                f"{self.candidate_label} agrees with {self.reference_label} on {self.top1_agreement:.1%} of next "
                f"tokens ({self.agreements}/{self.positions}), below the minimum {self.min_top1_agreement:.1%}"
            )
        return out + (self.kld.failures() if self.kld else [])

    def with_kld(self, kld: KldReport) -> "QualityReport":
        """This report with llama-perplexity's numbers and their gates; `passed` covers every gate."""
        report = self.model_copy(update={"kld": kld})
        gated = self.min_top1_agreement is not None or kld.passed is not None
        return report.model_copy(update={"passed": not report.gate_failures() if gated else None})

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    def markdown(self) -> str:
        gate = ""
        if self.min_top1_agreement is not None:
            met = self.top1_agreement >= self.min_top1_agreement
            gate = f"\n\nGate: top-1 agreement >= {self.min_top1_agreement:.1%}: {'passed' if met else 'FAILED'}"
        kld = f"\n\n## {self.kld.markdown()}" if self.kld else ""
        drop = "-" if self.mean_logprob_drop is None else f"{self.mean_logprob_drop:.4f}"
        return (
            f"# Quantization quality: {self.candidate_label} vs {self.reference_label}\n\n"
            f"{self.prompts} prompts x {self.tokens_per_prompt} tokens, greedy, teacher-forced.\n\n"
            "| metric | value |\n|---|---:|\n"
            f"| top-1 agreement | {self.top1_agreement:.2%} ({self.agreements}/{self.positions}) |\n"
            f"| identical continuations | {self.identical_continuations:.1%} |\n"
            f"| mean first divergence (tokens) | {self.mean_first_divergence:.1f} |\n"
            f"| mean log-prob drop on reference tokens | {drop} |\n"
            f"| positions outside candidate top-{TOP_K_PROBS} | {self.positions_outside_top_k} |"
            f"{gate}\n{kld}"
        )


class _EngineClient:
    """An engine's own HTTP API (not the OpenAI one): JSON posts whose failures say which engine."""

    engine = "the engine"

    def __init__(self, base_url: str, api_key: str | None, timeout: float):
        self.base = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers, trust_env=False)
        self.requests = 0

    def close(self) -> None:
        self.client.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.base + path
        self.requests += 1
        try:
            resp = self.client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise QualityCheckError(f"cannot reach {self.engine} at {url}: {exc}") from exc
        if resp.status_code != 200:
            raise QualityCheckError(f"POST {url} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()


class _LlamaServer(_EngineClient):
    """The native llama-server calls the check needs."""

    engine = "llama-server"

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._post("/tokenize", {"content": text, "add_special": True})["tokens"]]

    @staticmethod
    def _greedy_body(prompt: list[int], n: int, stream: bool) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "n_predict": n,
            "temperature": 0.0,
            "n_probs": TOP_K_PROBS,
            "ignore_eos": True,
            "stream": stream,
        }

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[dict[str, Any]], str]:
        """n greedy tokens after `prompt`, with each token's top log-probabilities."""
        out = self._post("/completion", self._greedy_body(prompt, n, stream=False))
        probs = out.get("completion_probabilities")
        if probs is None:
            raise QualityCheckError(
                f"{self.base}/completion returned no completion_probabilities; "
                "this llama-server version does not support n_probs"
            )
        return [int(p["id"]) for p in probs], probs, str(out.get("content", ""))

    def stream_greedy(self, prompt: list[int], n: int) -> Generator[tuple[dict[str, Any], str], None, None]:
        """Greedy tokens after `prompt` as they come: (probability entry, text piece).
        Closing the generator drops the connection, and the server stops generating."""
        url = self.base + "/completion"
        self.requests += 1
        try:
            with self.client.stream("POST", url, json=self._greedy_body(prompt, n, stream=True)) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise QualityCheckError(f"POST {url} answered {resp.status_code}: {resp.text[:300]}")
                for data in iter_sse_data(resp.iter_lines()):
                    if data == DONE:
                        return
                    msg = json.loads(data)
                    if msg.get("error"):
                        raise QualityCheckError(f"{url} streamed an error: {msg['error']}")
                    probs = msg.get("completion_probabilities") or []
                    for i, entry in enumerate(probs):
                        yield entry, str(msg.get("content", "")) if i == 0 else ""
                    if msg.get("stop"):
                        return
        except httpx.HTTPError as exc:
            raise QualityCheckError(f"llama-server at {url} failed mid-stream: {exc}") from exc


class _VllmServer(_EngineClient):
    """The vLLM calls a greedy reference needs: `/tokenize` and `/v1/completions` on token ids,
    with `return_tokens_as_token_ids` so tokens come back as ids, not text."""

    engine = "vLLM"

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float):
        super().__init__(base_url, api_key, timeout)
        self.model = model

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return super()._post(path, {"model": self.model, **body})

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._post("/tokenize", {"prompt": text, "add_special_tokens": True})["tokens"]]

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[float], str]:
        """n greedy tokens after `prompt` and each one's log-probability."""
        out = self._post(
            "/v1/completions",
            {
                "prompt": prompt,
                "max_tokens": n,
                "temperature": 0.0,
                "logprobs": 1,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            },
        )
        choice = out["choices"][0]
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("tokens")
        if not tokens:
            raise QualityCheckError(f"{self.base}/v1/completions returned no token log-probabilities")
        try:
            ids = [int(str(t).removeprefix("token_id:")) for t in tokens]
        except ValueError as exc:
            raise QualityCheckError(
                f"{self.base}/v1/completions did not return token ids ({tokens[0]!r}); "
                "this vLLM version lacks return_tokens_as_token_ids"
            ) from exc
        return ids, [float(lp) for lp in logprobs["token_logprobs"]], str(choice.get("text", ""))


class ReferenceContinuation(BaseModel):
    prompt: str
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]
    text: str


def greedy_reference(
    reference_url: str,
    prompts: int | Sequence[str] = QUALITY_DEFAULTS.prompts,
    tokens: int = QUALITY_DEFAULTS.tokens,
    *,
    api_key: str | None = None,
    timeout: float = 300.0,
    engine: str = "llamacpp",
    model: str | None = None,
) -> list[ReferenceContinuation]:
    """The reference model's greedy continuations of the prompts (the bundled ones by count),
    from llama-server, or from vLLM (`engine="vllm"`, serving `model`)."""
    if isinstance(prompts, int):
        bundled = bundled_prompts()
        texts = [bundled[i % len(bundled)] for i in range(prompts)]
    else:
        texts = list(prompts)
    if not texts or tokens < 1:
        raise ValueError("need at least one prompt and one token")
    if engine == "vllm":
        if model is None:
            raise ValueError("a vLLM reference needs the served model name")
        vllm = _VllmServer(reference_url, model, api_key, timeout)
        try:
            out = []
            for text in texts:
                ids = vllm.tokenize(text)
                out.append(_continuation(text, ids, *vllm.greedy(ids, tokens), tokens))
            return out
        finally:
            vllm.close()
    ref = _LlamaServer(reference_url, api_key, timeout)
    try:
        out = []
        for text in texts:
            ids = ref.tokenize(text)
            toks, probs, content = ref.greedy(ids, tokens)
            out.append(_continuation(text, ids, toks, [float(p["logprob"]) for p in probs], content, tokens))
        return out
    finally:
        ref.close()


def _continuation(
    text: str, ids: list[int], toks: list[int], logprobs: list[float], content: str, tokens: int
) -> ReferenceContinuation:
    if len(toks) != tokens:
        raise QualityCheckError(f"the reference produced {len(toks)} of {tokens} tokens")
    return ReferenceContinuation(prompt=text, prompt_ids=ids, tokens=toks, logprobs=logprobs, text=content)


def _logprob_of(entry: dict[str, Any], token: int) -> float | None:
    for alt in entry.get("top_logprobs") or []:
        if int(alt["id"]) == token:
            return float(alt["logprob"])
    return None


def compare_greedy(ref: ReferenceContinuation, candidate: _LlamaServer) -> tuple[PromptAgreement, list[float], int]:
    """Score one prompt; returns the agreement, the log-prob drops, and positions outside top-k."""
    if candidate.tokenize(ref.prompt) != ref.prompt_ids:
        raise QualityCheckError(
            "the reference and the candidate tokenize the same prompt differently; "
            "they are not the same model (in two precisions or on two engines)"
        )
    n = len(ref.tokens)
    agreements = 0
    drops: list[float] = []
    outside = 0
    first_divergence = n
    candidate_text = ""
    k = 0
    while k < n:
        start = k
        stream = candidate.stream_greedy(ref.prompt_ids + ref.tokens[:k], n - k)
        try:
            for entry, piece in stream:
                j = k
                if start == 0:
                    candidate_text += piece
                lp = _logprob_of(entry, ref.tokens[j])
                if lp is None:
                    outside += 1
                else:
                    drops.append(ref.logprobs[j] - lp)
                k = j + 1
                if int(entry["id"]) == ref.tokens[j]:
                    agreements += 1
                    if k == n:
                        break
                    continue
                first_divergence = min(first_divergence, j)
                break  # the rest of this rollout no longer follows the reference
        finally:
            stream.close()
        if k == start:
            raise QualityCheckError("the candidate streamed no tokens")
    return (
        PromptAgreement(
            prompt=ref.prompt,
            positions=n,
            agreements=agreements,
            first_divergence=first_divergence,
            reference_text=ref.text,
            candidate_text=candidate_text,
        ),
        drops,
        outside,
    )


def check_quant_quality(
    reference: str | Sequence[ReferenceContinuation],
    candidate_url: str,
    *,
    prompts: int | Sequence[str] = QUALITY_DEFAULTS.prompts,
    tokens: int = QUALITY_DEFAULTS.tokens,
    min_top1_agreement: float | None = None,
    reference_label: str = "F16",
    candidate_label: str = "candidate",
    api_key: str | None = None,
    reference_api_key: str | None = None,
    timeout: float = 300.0,
) -> QualityReport:
    """Compare a quantized model's llama-server with its F16 reference.

    `reference` is the reference llama-server's URL, or continuations `greedy_reference`
    made before (then `prompts` and `tokens` come from them). `prompts` is a count (the first
    n bundled prompts, cycled if more) or the prompts themselves. Sets `passed` when
    `min_top1_agreement` is given; raising is the caller's choice (`enforce_quality`).
    `api_key` is the candidate's; the reference's defaults to it.
    """
    if isinstance(reference, str):
        refs = greedy_reference(reference, prompts, tokens, api_key=reference_api_key or api_key, timeout=timeout)
        ref_requests = 2 * len(refs)
    else:
        refs = list(reference)
        ref_requests = 0
    if not refs:
        raise ValueError("no reference continuations to compare with")
    cand = _LlamaServer(candidate_url, api_key, timeout)
    try:
        per_prompt: list[PromptAgreement] = []
        drops: list[float] = []
        outside = 0
        for ref in refs:
            agreement, d, o = compare_greedy(ref, cand)
            per_prompt.append(agreement)
            drops += d
            outside += o
        requests = ref_requests + cand.requests
    finally:
        cand.close()
    positions = sum(p.positions for p in per_prompt)
    agreements = sum(p.agreements for p in per_prompt)
    top1 = agreements / positions
    return QualityReport(
        reference_label=reference_label,
        candidate_label=candidate_label,
        prompts=len(refs),
        tokens_per_prompt=len(refs[0].tokens),
        positions=positions,
        agreements=agreements,
        top1_agreement=top1,
        identical_continuations=sum(p.first_divergence == p.positions for p in per_prompt) / len(per_prompt),
        mean_first_divergence=sum(p.first_divergence for p in per_prompt) / len(per_prompt),
        mean_logprob_drop=(sum(drops) / len(drops)) if drops else None,
        positions_outside_top_k=outside,
        requests=requests,
        min_top1_agreement=min_top1_agreement,
        passed=None if min_top1_agreement is None else top1 >= min_top1_agreement,
        per_prompt=per_prompt,
    )


def enforce_quality(report: QualityReport) -> QualityReport:
    """Raise `QualityGateFailed` when a gate of the report is set and not met."""
    failures = report.gate_failures()
    if failures:
        raise QualityGateFailed(report, failures)
    return report
