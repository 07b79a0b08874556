"""The model spec: what an operator writes in `specs/<name>.yaml`.

One pydantic model per section. Every field carries its help text, so the JSON Schema in
`specs/schema.json` (generated from these models) documents the format for editors.
Unknown keys are errors everywhere (`extra="forbid"`): a typo must never be ignored.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from croniter import CroniterBadCronError, CroniterBadDateError, croniter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from cortex.quant import GGUF_TYPES

# Patterns end in \Z, never $: `$` also matches before a trailing newline, so "m\n" would pass.
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z", re.ASCII)
ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z", re.ASCII)
REVISION = re.compile(r"[^\s\x00-\x1f\x7f~^:?*\[\\]+\Z")  # git's rules for a ref name, in short
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}\Z", re.ASCII)

# Bounds on what a spec may declare. Each is far above any real deployment and low enough that
# planning stays instant: a plan walks every GPU, and llama.cpp's context is slots x tokens.
MAX_GPUS = 256  # GPUs on one host (a DGX has 8, an NVL72 rack 72)
MAX_CONTEXT = 2**24  # tokens per request (16M; the longest-context models have 10M)
MAX_CONTEXT_TOTAL = 2**30  # llama.cpp -c: all slots together
MAX_CONCURRENCY = 2**16  # simultaneous requests, slots, sequences
MAX_COUNT = 10**6  # other counts: batch sizes, threads, layers, benchmark requests
MAX_BYTES = 2**50  # 1 PiB: any size written in a spec
MAX_GPU_BYTES = 2**44  # 16 TiB of memory on one GPU
MAX_PROMPTS = 100  # smoke-test prompts (each is one request before a model goes live)
MAX_PROMPT_CHARS = 100_000
MAX_LIST = 64  # aliases, benchmark levels, gates
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_TEXT = 512  # other short strings: revisions, image names, quantization names

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r" *([0-9]{1,30}(?:\.[0-9]{1,30})?) *([a-zA-Z]{0,3}) *\Z", re.ASCII)


def parse_bytes(value: Any) -> int:
    """`46GiB`, `48GB`, `512 MiB` or a plain integer of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 46GiB or 48GB, not a boolean")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        if value > MAX_BYTES:
            raise ValueError(f"{value} bytes is more than {format_bytes(MAX_BYTES)}; write a real size such as 46GiB")
        return value
    if isinstance(value, float):
        raise ValueError("write a size with a unit, such as 46GiB or 48GB")
    if not isinstance(value, str):
        raise ValueError("expected a size such as 46GiB or 48GB")
    m = _SIZE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{short_repr(value)} is not a size; write it like 46GiB, 48GB or 512MiB")
    size = int(Decimal(m.group(1)) * _UNITS[m.group(2).lower()])  # exact: no float overflow
    if size <= 0:
        raise ValueError("a size must be positive")
    if size > MAX_BYTES:
        raise ValueError(f"{short_repr(value)} is more than {format_bytes(MAX_BYTES)}; write a real size such as 46GiB")
    return size


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: an error message never echoes a megabyte."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 5] + "...'" + f" ({len(r)} chars)"


def format_bytes(n: int | float) -> str:
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


Bytes = Annotated[
    int,
    BeforeValidator(parse_bytes),
    PlainSerializer(format_bytes, return_type=str),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$"},
            ],
            "description": "bytes, or a size with a unit: 46GiB, 48GB, 512MiB",
        }
    ),
]


class Section(BaseModel):
    # allow_inf_nan=False: .inf and .nan are refused in every float field (a gate of `max: .nan`
    # would never fail, a rope base of .inf is no number llama.cpp can use).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- source


class Source(Section):
    """Where the weights come from: exactly one of an HF repo, a local HF folder, or a GGUF file."""

    repo: str | None = Field(
        None, max_length=200, description="Hugging Face repo id, e.g. meta-llama/Meta-Llama-3-8B-Instruct"
    )
    revision: str = Field(
        "main",
        min_length=1,
        max_length=MAX_TEXT,
        description="branch, tag or commit sha of `repo`; resolved to a commit sha and recorded",
    )
    include: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]] | None = Field(
        None, max_length=1000, description="file patterns to fetch from `repo` (default: what the plan needs)"
    )
    path: Path | None = Field(None, description="local folder holding an HF checkpoint (config.json, *.safetensors)")
    gguf: str | None = Field(
        None,
        max_length=MAX_PATH_CHARS,
        description="a GGUF file: a local path, or with `repo` a file name inside that repo; "
        "for split models name the first part (x-00001-of-00003.gguf)",
    )

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and not REPO_ID.match(v):
            raise ValueError(f"{short_repr(v)} is not a Hugging Face repo id; write it as owner/name")
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str) -> str:
        if not REVISION.match(v):
            raise ValueError(f"{short_repr(v)} is not a branch, tag or commit sha (no spaces, newlines or ~^:?*[\\)")
        return v

    @field_validator("path", "gguf")
    @classmethod
    def _local_path(cls, v: Any) -> Any:
        if v is not None and "\x00" in str(v):
            raise ValueError("a path cannot contain a NUL byte")
        if v is not None and len(str(v)) > MAX_PATH_CHARS:
            raise ValueError(f"a path is at most {MAX_PATH_CHARS} characters")
        return v

    @field_validator("gguf")
    @classmethod
    def _gguf_name(cls, v: str | None) -> str | None:
        if v is not None and not v.lower().endswith(".gguf"):
            raise ValueError(
                f"{short_repr(v)} does not end in .gguf; name the GGUF file (the first part of a split set)"
            )
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "Source":
        given = [n for n in ("repo", "path", "gguf") if getattr(self, n) is not None]
        if self.repo is not None and self.gguf is not None and self.path is None:
            return self  # a GGUF file inside an HF repo
        if len(given) == 0:
            raise ValueError(
                "no source given: set one of `repo` (an HF repo), `path` (a local HF folder) "
                "or `gguf` (a GGUF file, local or with `repo`)"
            )
        if len(given) > 1:
            raise ValueError(
                f"two sources given ({', '.join(given)}): keep exactly one of `repo`, `path` or `gguf` "
                "(`repo` together with `gguf` means a GGUF file inside that repo)"
            )
        if self.include is not None and self.repo is None:
            raise ValueError("`include` only applies to an HF repo source (`repo`)")
        return self

    @property
    def kind(self) -> Literal["hf_repo", "hf_dir", "gguf_file", "gguf_repo"]:
        if self.repo and self.gguf:
            return "gguf_repo"
        if self.repo:
            return "hf_repo"
        if self.path is not None:
            return "hf_dir"
        return "gguf_file"


# --------------------------------------------------------------------------- engines


def _extra_args_field(label: str) -> Any:
    return Field(
        default_factory=list,
        description=f"more {label} flags, each with its value. Only flags reviewed as safe for the targeted "
        f"{label} version pass (cortex/data/flags/*.extra-args.yaml); flags that write or read files, run "
        "tools, reach other machines, read a config file or bind the network are refused unless "
        "unsafe_extra_args is true. Host, port, API key, model, flags with a setting above, unknown flags "
        "and bare positional arguments are always refused",
    )


def _unsafe_extra_args_field() -> Any:
    return Field(
        False,
        description="let extra_args carry flags the allow-list refuses (file writes, tool execution, remote "
        "backends, config files, network binding, file reads); `cortex plan` and the prepare report name "
        "each one as UNSAFE",
    )


def _env_field() -> Any:
    return Field(
        default_factory=dict,
        description="environment variables for the engine, NAME: value. The engine otherwise gets a minimal "
        "environment (PATH, HOME, locale, TMPDIR, its API key, GPU visibility), never the deploying shell's. "
        "Allowed: TZ and tuning variables (OMP_*, KMP_*, MKL_*, OPENBLAS_*, GOMP_*, NCCL_*, CUDA_*, GGML_*, "
        "VLLM_*, TORCH_*, PYTORCH_*) except those Cortex sets or that load code or name files; no secrets",
    )


def _checked_extra_args(args: list[str], engine: str, info: ValidationInfo) -> list[str]:
    from cortex.engines.extra_args import check_extra_args  # late: the engine tables import this module

    check_extra_args(args, engine, unsafe=bool(info.data.get("unsafe_extra_args")))
    return args


def _checked_env(env: dict[str, str]) -> dict[str, str]:
    from cortex.engines.extra_args import check_engine_env

    return check_engine_env(env)


VllmDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


class VllmSettings(Section):
    """vLLM settings; each maps to one flag in cortex/engines/vllm.py. Unset = the plan decides."""

    tensor_parallel_size: int | None = Field(
        None, ge=1, le=MAX_GPUS, description="--tensor-parallel-size (default: planned)"
    )
    pipeline_parallel_size: int | None = Field(None, ge=1, le=MAX_GPUS, description="--pipeline-parallel-size")
    dtype: VllmDtype | None = Field(None, description="--dtype")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="--gpu-memory-utilization (0..1]")
    max_model_len: int | None = Field(
        None, ge=16, le=MAX_CONTEXT, description="--max-model-len (default: resources.context_length)"
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"] | None = Field(
        None, description="--kv-cache-dtype"
    )
    quantization: str | None = Field(
        None, min_length=1, max_length=64, description="--quantization (awq, gptq, fp8, ...)"
    )
    block_size: Literal[1, 8, 16, 32, 64, 128, 256] | None = Field(
        None, description="--block-size (tokens per KV block)"
    )
    swap_space_gb: float | None = Field(
        None,
        ge=0,
        le=2**20,
        description="--swap-space (GiB); vLLM 0.32 removed this flag, so setting it there is an error",
    )
    enforce_eager: bool | None = Field(None, description="--enforce-eager (no CUDA graphs)")
    enable_prefix_caching: bool | None = Field(None, description="--enable-prefix-caching / --no-enable-prefix-caching")
    enable_chunked_prefill: bool | None = Field(
        None, description="--enable-chunked-prefill / --no-enable-chunked-prefill"
    )
    cuda_graph_sizes: list[Annotated[int, Field(ge=1, le=MAX_COUNT)]] | None = Field(
        None, max_length=1024, description="CUDA graph capture sizes (vLLM 0.32: --cudagraph-capture-sizes)"
    )
    max_num_seqs: int | None = Field(
        None, ge=1, le=MAX_CONCURRENCY, description="--max-num-seqs (requests batched at once)"
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_CONTEXT,
        description="--max-num-batched-tokens (tokens per scheduler step; sizes the activation peak)",
    )
    trust_remote_code: bool | None = Field(None, description="--trust-remote-code")
    # before extra_args: its validator reads this field
    unsafe_extra_args: bool = _unsafe_extra_args_field()
    extra_args: list[str] = _extra_args_field("vLLM")
    env: dict[str, str] = _env_field()

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return _checked_extra_args(v, "vllm", info)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return _checked_env(v)


CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


class LlamaCppSettings(Section):
    """llama.cpp (llama-server) settings; each maps to one flag in cortex/engines/llamacpp.py."""

    ngl: int | None = Field(
        None, ge=0, le=MAX_COUNT, description="-ngl, layers on the GPU (999 = all; default: planned)"
    )
    tensor_split: list[Annotated[float, Field(ge=0, le=MAX_COUNT)]] | None = Field(
        None,
        max_length=MAX_GPUS,
        description="--tensor-split, share of the model per GPU (default: proportional to free memory)",
    )
    batch_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="-b, logical batch size")
    ubatch_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="-ub, physical batch size")
    threads: int | None = Field(None, ge=1, le=MAX_COUNT, description="-t, CPU threads for generation")
    context_size: int | None = Field(
        None, ge=16, le=MAX_CONTEXT_TOTAL, description="-c, total context shared by all slots"
    )
    parallel: int | None = Field(
        None, ge=1, le=MAX_CONCURRENCY, description="-np, parallel slots (default: planned from resources.concurrency)"
    )
    rope_freq_base: float | None = Field(None, gt=0, le=1e15, description="--rope-freq-base")
    rope_freq_scale: float | None = Field(None, gt=0, le=1e6, description="--rope-freq-scale")
    flash_attention: Literal["on", "off", "auto"] | bool | None = Field(None, description="-fa on|off|auto")
    mlock: bool | None = Field(None, description="keep the model in RAM (llama-server --load-mode mlock or mmap+mlock)")
    no_mmap: bool | None = Field(
        None, description="do not memory-map the model (llama-server --load-mode none, or mlock with mlock)"
    )
    numa: Literal["distribute", "isolate", "numactl"] | None = Field(None, description="--numa")
    split_mode: Literal["none", "layer", "row"] | None = Field(None, description="-sm, how to split across GPUs")
    cache_type_k: CacheType | None = Field(None, description="-ctk, KV cache type for K")
    cache_type_v: CacheType | None = Field(None, description="-ctv, KV cache type for V")
    pooling: Literal["none", "mean", "cls", "last", "rank"] | None = Field(
        None, description="--pooling for embed models (default: the model's own; chat models need mean)"
    )
    # before extra_args: its validator reads this field
    unsafe_extra_args: bool = _unsafe_extra_args_field()
    extra_args: list[str] = _extra_args_field("llama-server")
    env: dict[str, str] = _env_field()

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return _checked_extra_args(v, "llamacpp", info)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return _checked_env(v)

    @field_validator("tensor_split")
    @classmethod
    def _split_not_zero(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or sum(v) <= 0):
            raise ValueError("tensor_split needs at least one positive share, e.g. [0.5, 0.5]")
        return v


# --------------------------------------------------------------------------- resources


class Resources(Section):
    gpus: int | list[Annotated[int, Field(ge=0, lt=MAX_GPUS)]] | None = Field(
        None,
        description="GPUs to use: a count, or a list of device ids. Default: all GPUs found (none on a CPU host)",
    )
    gpu_memory: Bytes | None = Field(
        None, description="memory per GPU (e.g. 46GiB); lets a plan be made on a machine without those GPUs"
    )
    concurrency: int = Field(4, ge=1, le=MAX_CONCURRENCY, description="expected simultaneous requests")
    context_length: int | None = Field(
        None, ge=16, le=MAX_CONTEXT, description="context length per request (default: the model's, capped at 8192)"
    )

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError("gpus must be a count >= 0 or a list of device ids")
        if isinstance(v, int) and v > MAX_GPUS:
            raise ValueError(f"gpus {v} is more than {MAX_GPUS} GPUs on one host; give the count of one host's GPUs")
        if isinstance(v, list) and len(v) > MAX_GPUS:
            raise ValueError(f"gpus lists {len(v)} devices, more than {MAX_GPUS} on one host")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("gpus lists a device id twice")
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _gpu_memory(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_GPU_BYTES:
            raise ValueError(
                f"{format_bytes(v)} on one GPU is more than {format_bytes(MAX_GPU_BYTES)}; give one GPU's memory"
            )
        return v

    @property
    def gpu_count(self) -> int:
        """How many GPUs `gpus` declares (0 when it is left to detection), e.g. for the cost per
        GPU-hour in a benchmark."""
        return len(self.gpus) if isinstance(self.gpus, list) else int(self.gpus or 0)


class Images(Section):
    vllm: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT,
        description="vLLM image (default: vllm/vllm-openai at the pinned version)",
    )
    llamacpp: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT,
        description="llama.cpp server image (default: cortex/llamacpp-server, built from images/)",
    )


# --------------------------------------------------------------------------- tests, benchmark, schedule


class SmokeTests(Section):
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        default_factory=lambda: ["Say hello in one short sentence."],
        max_length=MAX_PROMPTS,
        description="prompts sent as smoke tests",
    )
    max_tokens: int = Field(16, ge=1, le=4096)


LatencyMetric = Literal["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"]
RateMetric = Literal["output_tokens_per_s", "requests_per_s", "goodput_per_s"]
GateStat = Literal["mean", "p50", "p90", "p99"]
PromptSet = Literal["random", "bundled"]


class GoodputSlo(Section):
    """Per-request service level objectives; a request that meets all set ones is 'good'."""

    ttft_ms: float | None = Field(None, gt=0, le=1e9)
    tpot_ms: float | None = Field(None, gt=0, le=1e9)
    e2el_ms: float | None = Field(None, gt=0, le=1e9)

    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


class Gate(Section):
    """One SLO: a benchmark metric must stay under `max` or above `min` (at one level, or all)."""

    metric: Literal[LatencyMetric, RateMetric]
    stat: GateStat = "p99"
    concurrency: int | None = Field(
        None, ge=1, le=MAX_CONCURRENCY, description="the level it applies to (default: every level)"
    )
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _bound(self) -> "Gate":
        if self.max is None and self.min is None:
            raise ValueError("a gate needs `max` or `min`")
        return self


class QualityCheck(Section):
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="gate: minimum top-1 agreement with F16")
    prompts: int = Field(16, ge=1, le=10_000)
    tokens: int = Field(32, ge=1, le=MAX_CONTEXT)
    max_kld: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="gate: maximum mean KL-divergence from F16, as llama-perplexity measures it on Cortex's corpus",
    )
    min_same_top_p: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="gate: minimum share of tokens where the quant ranks the same token first as F16 "
        "(llama-perplexity's 'same top p', 0-1)",
    )

    def measures_kld(self) -> bool:
        """KL-divergence is measured (llama-perplexity on this machine's CPU) when a gate asks for it."""
        return self.max_kld is not None or self.min_same_top_p is not None


class BenchmarkLoad(Section):
    """The load a benchmark sends. The one place of these fields and their defaults: the
    spec's `benchmark` section and `cortex.bench.BenchmarkSettings` both build on it."""

    concurrency: list[Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]] = Field(
        default_factory=lambda: [1, 4, 16],
        min_length=1,
        max_length=MAX_LIST,
        description="concurrency levels, measured one after another",
    )
    requests: int = Field(32, ge=1, le=MAX_COUNT, description="requests per concurrency level")
    input_len: int = Field(128, ge=1, le=MAX_CONTEXT, description="prompt tokens per request (random prompts)")
    output_len: int = Field(64, ge=1, le=MAX_CONTEXT, description="tokens to generate per request")
    request_rate: float | None = Field(
        None, gt=0, le=1e6, description="requests/s (default: closed loop at the concurrency)"
    )
    burstiness: float = Field(1.0, gt=0, le=1e6, description="1.0 = Poisson arrivals, otherwise a gamma shape")
    # validate_default: the schema shows 300, a benchmark's settings hold 300.0 (a float).
    max_duration_s: float = Field(300, gt=0, le=7 * 86400, validate_default=True, description="time bound per level")
    prompts: PromptSet = Field(
        "random", description="random token ids (exactly input_len tokens) or the bundled English prompts"
    )
    gpu_hour_price_usd: float | None = Field(
        None, ge=0, le=1e6, description="USD per GPU-hour, for the cost per 1M output tokens"
    )


class BenchmarkSpec(BenchmarkLoad):
    goodput_slo: GoodputSlo | None = None
    gates: list[Gate] = Field(default_factory=list, max_length=MAX_LIST)
    quality: QualityCheck | None = None


class Schedule(Section):
    cron: str = Field(max_length=MAX_TEXT, description="cron expression for scheduled redeploys, e.g. '0 3 * * *'")
    timezone: str = Field("UTC", max_length=64, description="IANA timezone, e.g. Europe/Berlin")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        fields = v.split(" ")
        fields = [f for f in fields if f]
        if len(fields) != 5 or re.search(r"[^\S ]", v) or not croniter.is_valid(v):
            raise ValueError(
                f"{short_repr(v)} is not a valid cron expression; write exactly five fields: minute hour day month "
                "weekday (e.g. '0 3 * * *'; no seconds or year field)"
            )
        # croniter looks at most 50 years ahead: '0 0 31 2 *' (February 31st) is valid syntax that never fires.
        try:
            croniter(v, datetime(2000, 1, 1)).get_next(datetime)
        except (CroniterBadDateError, CroniterBadCronError):
            raise ValueError(f"{short_repr(v)} never fires (no such date); check the day and month fields") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: 'America' is a folder of zones
            raise ValueError(
                f"{short_repr(v)} is not a known timezone; use an IANA name such as UTC or Europe/Berlin"
            ) from None
        return v


# --------------------------------------------------------------------------- placement (a fleet of hosts)

# A host name as DNS writes it (RFC 1123): labels of letters, digits and dashes, joined by dots.
HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z",
    re.ASCII,
)
# Label keys and values as Kubernetes writes them: an optional prefix/ then a name (63 at most).
LABEL_KEY = re.compile(
    r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z", re.ASCII
)
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?\Z", re.ASCII)
MAX_REPLICAS = 1024  # replicas of one model: far beyond a fleet's GPUs, low enough that placing stays instant
MAX_HOSTS = 4096  # hosts named in an allow-list, hosts in a fleet
MAX_LABELS = 64  # labels on a host or in a selector


def check_host_name(v: str) -> str:
    if not HOST_NAME.match(v):
        raise ValueError(
            f"{short_repr(v)} is not a host name; use letters, digits, dashes and dots (gpu-01, gpu-01.lab)"
        )
    return v


def check_labels(v: Any) -> Any:
    """Labels are `key: value` text, as Kubernetes node labels are. A number or a boolean is refused,
    not turned into text: `true` would become `True` and never match a host's `"true"`."""
    if not isinstance(v, dict):
        raise ValueError("labels are a mapping of key: value, e.g. {gpu: h100}")
    if len(v) > MAX_LABELS:
        raise ValueError(f"{len(v)} labels; at most {MAX_LABELS}")
    for key, value in v.items():
        if not isinstance(key, str) or not LABEL_KEY.match(key):
            raise ValueError(
                f"label key {short_repr(key)} is not a label name; use letters, digits, -, _ and . "
                "(63 at most), optionally after a prefix/ such as cortex.ai/"
            )
        if not isinstance(value, str):
            raise ValueError(f"label {key}: {short_repr(value)} is not text; quote it: {key}: '{value}'")
        if not LABEL_VALUE.match(value):
            raise ValueError(
                f"label {key}: {short_repr(value)} is not a label value; use letters, digits, -, _ and . (63 at most)"
            )
    return v


Labels = Annotated[dict[str, str], BeforeValidator(check_labels)]


class PlacementSpec(Section):
    """Which hosts of the fleet may run the model's replicas, and how the replicas spread."""

    hosts: list[str] | None = Field(
        None,
        max_length=MAX_HOSTS,
        description="allow-list of host names (default: every host in the fleet)",
    )
    labels: Labels = Field(
        default_factory=dict,
        description="selector: a host must carry every one of these labels with this value, e.g. {gpu: h100}",
    )
    spread: Literal["host", "none"] = Field(
        "host",
        description="host = at most one replica per host unless there are fewer eligible hosts than replicas; "
        "none = replicas may share a host (each goes to the least loaded host that fits)",
    )

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty allow-list allows no host; name hosts, or leave `hosts` out to allow all")
        for h in v:
            check_host_name(h)
        lowered = [h.lower() for h in v]
        if len(set(lowered)) != len(lowered):
            raise ValueError("a host is listed twice")
        return v


# --------------------------------------------------------------------------- the spec


class ModelSpec(Section):
    """A model to prepare, serve, test, benchmark and register."""

    name: str = Field(description="served model name (DNS-safe: lowercase letters, digits, dashes)")
    aliases: list[str] = Field(
        default_factory=list, max_length=MAX_LIST, description="other names the gateway routes to this model"
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        max_length=MAX_LIST,
        description="models (or aliases) the gateway tries in order when this one has no healthy replica "
        "or its replica fails before answering",
    )
    task: Literal["generate", "embed"] = "generate"
    source: Source
    engine: Literal["auto", "vllm", "llamacpp"] = Field("auto", description="auto = the decision rules pick")
    quantization: str = Field(
        "auto", max_length=64, description="GGUF type for llama.cpp (auto = best that fits), e.g. Q8_0, Q4_K_M"
    )
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    resources: Resources = Field(default_factory=Resources)
    runtime: Literal["docker", "process"] = Field("process", description="process = local subprocess (no Docker)")
    image: Images = Field(default_factory=Images)
    tests: SmokeTests = Field(default_factory=SmokeTests)
    benchmark: BenchmarkSpec | None = None
    schedule: Schedule | None = None
    replicas: int = Field(
        1, ge=1, le=MAX_REPLICAS, description="copies of the model to run, each on a host of the fleet"
    )
    placement: PlacementSpec = Field(default_factory=PlacementSpec)

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not DNS_LABEL.match(v):
            raise ValueError(
                f"{short_repr(v)} is not DNS-safe: use 1-63 lowercase letters, digits and dashes, "
                "starting and ending with a letter or digit"
            )
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        for a in v:
            if not ALIAS.match(a):
                raise ValueError(f"alias {short_repr(a)} has characters a model name cannot have")
        if len(set(v)) != len(v):
            raise ValueError("an alias is listed twice")
        return v

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks(cls, v: list[str]) -> list[str]:
        for f in v:
            if not ALIAS.match(f):
                raise ValueError(f"fallback {short_repr(f)} has characters a model name cannot have")
        if len(set(v)) != len(v):
            raise ValueError("a fallback is listed twice")
        return v

    @field_validator("quantization")
    @classmethod
    def _quant(cls, v: str) -> str:
        if v == "auto":
            return v
        canon = {t.upper(): t for t in GGUF_TYPES}
        if v.upper() not in canon:
            raise ValueError(f"{short_repr(v)} is not a GGUF type; use auto or one of {', '.join(GGUF_TYPES)}")
        return canon[v.upper()]

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.name in self.aliases:
            raise ValueError("an alias repeats the model's own name")
        if self.name in self.fallbacks or set(self.aliases) & set(self.fallbacks):
            raise ValueError("a fallback names this model itself (its name or an alias); list other models")
        if self.source.kind in ("gguf_file", "gguf_repo") and self.engine == "vllm":
            raise ValueError("engine vllm cannot serve a GGUF source here; use engine: llamacpp or auto")
        if self.quantization != "auto" and self.engine == "vllm":
            raise ValueError("`quantization` picks a GGUF type for llama.cpp; for vLLM use vllm.quantization")
        return self
