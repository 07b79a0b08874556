"""What load a benchmark sends, and the knobs of the client that sends it.

The load fields and their defaults are the spec's (`cortex.spec.BenchmarkLoad`), so a spec's
`benchmark` section and `cortex bench` mean the same load; this adds what only the client
needs (GPU count for cost, seed, warmup, timeouts, the random prompts' token range).
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ConfigDict, Field

from cortex.spec import BenchmarkLoad, GoodputSlo

GoodputSLO = GoodputSlo  # the name this module has always exported


class BenchmarkSettings(BenchmarkLoad):
    """What load to send: the spec's `benchmark` load plus the GPU count for cost."""

    # Settings also come back from saved results files; tolerate keys this version lacks.
    model_config = ConfigDict(extra="ignore")

    gpus: int = Field(1, ge=0, description="GPUs the deployment holds, for cost")
    goodput_slo: GoodputSlo = Field(default_factory=GoodputSlo)
    ignore_eos: bool = Field(True, description="generate exactly output_len tokens")
    seed: int = 0
    warmup: bool = Field(True, description="one unmeasured request first, as vLLM does")
    request_timeout_s: float = 600.0
    # Random prompt token ids are drawn from this range: above the special tokens most
    # vocabularies put first, below the size of the smallest common vocabulary (32k).
    token_id_low: int = 1000
    token_id_high: int = 30000

    @classmethod
    def from_spec(cls, benchmark: Any, *, gpus: int = 1, **overrides: Any) -> "BenchmarkSettings":
        """Build settings from the spec's `benchmark` section (a pydantic model or a mapping)."""
        if benchmark is None:
            data: dict[str, Any] = {}
        elif isinstance(benchmark, Mapping):
            data = dict(benchmark)
        elif hasattr(benchmark, "model_dump"):
            data = benchmark.model_dump()
        else:
            data = dict(vars(benchmark))
        known = set(cls.model_fields)
        data = {k: v for k, v in data.items() if k in known and v is not None}
        slo = data.get("goodput_slo")
        if slo is not None and not isinstance(slo, (Mapping, GoodputSlo)):
            data["goodput_slo"] = slo.model_dump() if hasattr(slo, "model_dump") else vars(slo)
        data["gpus"] = gpus
        data.update(overrides)
        return cls.model_validate(data)
