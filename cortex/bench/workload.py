"""What a benchmark sends and when: the prompts of a level and their send times.

Load: for each concurrency level, a fixed number of requests, either all at once (closed
loop: at most `concurrency` in flight) or arriving at `request_rate` per second with
Poisson (burstiness 1) or gamma inter-arrival times, still capped at `concurrency`.

Prompts are random token ids sent as a token-id prompt (exactly `input_len` tokens without
needing a tokenizer here) or a bundled set of English prompts (also the quality check's).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from importlib import resources

import numpy as np

from cortex.bench.settings import BenchmarkSettings


def arrival_offsets(
    n: int, request_rate: float | None, burstiness: float = 1.0, *, rng: np.random.Generator | None = None
) -> list[float]:
    """Send times (seconds from the start) of n requests, as vLLM's `get_request` draws them.

    None (or inf) means all at once. Otherwise gamma inter-arrival times with shape
    `burstiness` and mean 1/rate (burstiness 1 is a Poisson process), rescaled so the last
    request is sent at exactly n/rate, which removes the run-to-run spread of the sum.
    """
    if n <= 0:
        return []
    if request_rate is None or math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    rng = rng or np.random.default_rng(0)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    offsets *= (n / request_rate) / offsets[-1]
    return [float(x) for x in offsets]


@dataclass(frozen=True)
class Prompt:
    """One request's prompt: token ids (exact length) or text (length known from usage)."""

    prompt: list[int] | str
    expected_len: int | None


def bundled_prompts() -> list[str]:
    """The short English prompts shipped with Cortex (benchmark and quality check)."""
    text = resources.files("cortex").joinpath("data/prompts.json").read_text()
    return list(json.loads(text)["prompts"])


def make_prompts(settings: BenchmarkSettings, n: int, *, seed: int) -> list[Prompt]:
    """n prompts for one level. Random prompts differ per seed, so no level or run hits
    another's prompt cache."""
    if settings.prompts == "bundled":
        texts = bundled_prompts()
        rnd = random.Random(seed)
        start = rnd.randrange(len(texts))
        return [Prompt(texts[(start + i) % len(texts)], None) for i in range(n)]
    if settings.token_id_high - settings.token_id_low < 2:
        raise ValueError("token_id_high must exceed token_id_low")
    rng = np.random.default_rng(seed)
    ids = rng.integers(settings.token_id_low, settings.token_id_high, size=(n, settings.input_len))
    return [Prompt([int(t) for t in row], settings.input_len) for row in ids]
