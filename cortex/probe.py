"""Smoke tests: does an OpenAI-compatible endpoint really serve the model?

They check structure, not wisdom: the served name is listed, a chat completion and a
completion return non-empty text with token counts, streaming sends SSE chunks that end in
`[DONE]`, and an embedding model returns vectors of the model's dimension. Every check runs
and is reported, even after one fails, so one run shows everything that is wrong.

Plain httpx against a base URL; it knows nothing of engines, runtimes or Prefect.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Literal

import httpx
from pydantic import BaseModel, Field

from cortex.sse import DONE, iter_sse_data

DEFAULT_PROMPTS = ["Say hello in one short sentence."]


class CheckResult(BaseModel):
    name: str
    passed: bool
    detail: str
    seconds: float


class SmokeResult(BaseModel):
    endpoint: str
    model: str
    task: Literal["generate", "embed"]
    passed: bool
    checks: list[CheckResult] = Field(default_factory=list)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        ok = sum(c.passed for c in self.checks)
        text = f"smoke tests {'passed' if self.passed else 'FAILED'}: {ok}/{len(self.checks)} checks on {self.model} at {self.endpoint}"
        for check in self.failures():
            text += f"\n  {check.name}: {check.detail}"
        return text

    def table(self) -> list[dict[str, Any]]:
        """Rows for a Prefect table artifact."""
        return [
            {
                "check": c.name,
                "result": "pass" if c.passed else "FAIL",
                "detail": c.detail,
                "seconds": round(c.seconds, 2),
            }
            for c in self.checks
        ]


class SmokeTestFailed(Exception):
    """The endpoint answered, but not as an OpenAI-compatible server of the model should."""

    def __init__(self, result: SmokeResult):
        self.result = result
        super().__init__(result.summary())


class _CheckFailed(Exception):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _CheckFailed(message)


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise _CheckFailed(f"HTTP {response.status_code}: {response.text[:300]}")
    try:
        return response.json()
    except ValueError:
        raise _CheckFailed(f"answer is not JSON: {response.text[:300]}") from None


def _usage(body: dict[str, Any]) -> str:
    usage = body.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    _require(isinstance(prompt, int) and prompt > 0, f"usage.prompt_tokens missing or zero: {usage}")
    _require(isinstance(completion, int) and completion > 0, f"usage.completion_tokens missing or zero: {usage}")
    return f"{prompt} prompt + {completion} completion tokens"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def smoke_test(
    endpoint: str,
    model: str,
    *,
    task: Literal["generate", "embed"] = "generate",
    prompts: list[str] | None = None,
    max_tokens: int = 16,
    api_key: str | None = None,
    embedding_dim: int | None = None,
    timeout_s: float = 120.0,
) -> SmokeResult:
    """Run the smoke tests against `endpoint` (the engine's or gateway's base URL, without /v1)."""
    prompts = prompts or DEFAULT_PROMPTS
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    checks: list[CheckResult] = []
    with httpx.Client(base_url=endpoint.rstrip("/"), headers=headers, timeout=timeout_s) as client:

        def run(name: str, check: Callable[[], str]) -> None:
            started = time.monotonic()
            try:
                detail, passed = check(), True
            except _CheckFailed as exc:
                detail, passed = str(exc), False
            except httpx.HTTPError as exc:
                detail, passed = f"{type(exc).__name__}: {exc}", False
            checks.append(CheckResult(name=name, passed=passed, detail=detail, seconds=time.monotonic() - started))

        def models() -> str:
            body = _json(client.get("/v1/models"))
            ids = [m.get("id") for m in body.get("data") or []]
            _require(model in ids, f"/v1/models lists {ids}, not {model!r}")
            return f"lists {model!r}"

        def chat(prompt: str) -> Callable[[], str]:
            def check() -> str:
                body = _json(
                    client.post(
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens,
                            "temperature": 0,
                        },
                    )
                )
                choices = body.get("choices") or []
                _require(bool(choices), f"no choices in {body}")
                message = choices[0].get("message") or {}
                text = (message.get("content") or "") or (message.get("reasoning_content") or "")
                _require(bool(text.strip()), f"empty message: {message}")
                return f"{_short(text)!r} ({_usage(body)})"

            return check

        def completion() -> str:
            # A raw completion continues text; instruct models often end an unterminated
            # sentence at once (EOS, empty text), so the prompt ends with a newline.
            prompt = prompts[0] if prompts[0].endswith("\n") else prompts[0] + "\n"
            body = _json(
                client.post(
                    "/v1/completions",
                    json={
                        "model": model,
                        "prompt": prompt,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    },
                )
            )
            choices = body.get("choices") or []
            _require(bool(choices), f"no choices in {body}")
            text = choices[0].get("text") or ""
            _require(bool(text.strip()), f"empty text: {choices[0]}")
            return f"{_short(text)!r} ({_usage(body)})"

        def stream() -> str:
            chunks, text, last = 0, "", None
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": prompts[0]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                },
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise _CheckFailed(f"HTTP {response.status_code}: {response.text[:300]}")
                content_type = response.headers.get("content-type", "")
                _require(
                    content_type.startswith("text/event-stream"),
                    f"content-type is {content_type!r}, not text/event-stream",
                )
                for last in iter_sse_data(response.iter_lines()):
                    if last == DONE:
                        break
                    try:
                        event = json.loads(last)
                    except ValueError:
                        raise _CheckFailed(f"SSE data is not JSON: {last[:200]}") from None
                    chunks += 1
                    for choice in event.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
            _require(last == DONE, f"stream ended without data: [DONE] (last data: {last!r})")
            _require(bool(text.strip()), f"{chunks} chunks but no text in their deltas")
            return f"{chunks} chunks, {_short(text)!r}, ended with [DONE]"

        def embeddings() -> str:
            inputs = prompts[:2] if len(prompts) >= 2 else [prompts[0], prompts[0] + " Again."]
            body = _json(client.post("/v1/embeddings", json={"model": model, "input": inputs}))
            data = body.get("data") or []
            _require(len(data) == len(inputs), f"{len(data)} embeddings for {len(inputs)} inputs")
            dims = {len(item.get("embedding") or []) for item in data}
            _require(len(dims) == 1 and 0 not in dims, f"embedding lengths differ or are empty: {sorted(dims)}")
            dim = dims.pop()
            if embedding_dim is not None:
                _require(dim == embedding_dim, f"dimension {dim}, expected the model's {embedding_dim}")
            _require(all(isinstance(x, (int, float)) for x in data[0]["embedding"][:8]), "embedding is not numbers")
            return f"{len(data)} vectors of dimension {dim}"

        run("models", models)
        if task == "embed":
            run("embeddings", embeddings)
        else:
            for i, prompt in enumerate(prompts):
                run("chat" if len(prompts) == 1 else f"chat[{i}]", chat(prompt))
            run("completion", completion)
            run("stream", stream)
    return SmokeResult(endpoint=endpoint, model=model, task=task, passed=all(c.passed for c in checks), checks=checks)
