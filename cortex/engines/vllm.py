"""vLLM's OpenAI API server: the flag table and the server command (vLLM 0.32)."""

from __future__ import annotations

from cortex.engines import FlagMap

ENGINE_LABEL = "vLLM"
FLAG_TABLE_ENGINE = "vllm"
SECTION = "vllm"
PORT = 8000
STOP_TIMEOUT_S = 5  # the seed's graceful stop for vLLM
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's server reads its API key from this variable
DEFAULT_IMAGE = "vllm/vllm-openai"  # tagged v<version>

# What vLLM logs as it starts, and the phase each line begins; in order (vLLM 0.32's messages).
STARTUP_PHASES: list[tuple[str, str]] = [
    (r"Starting to load model", "loading weights"),
    (r"Loading weights took|Model loading took", "weights loaded"),
    (r"Available KV cache memory|KV cache size: ", "allocating KV cache"),
    (r"Capturing CUDA graphs", "capturing CUDA graphs"),
    (r"init engine \(profile, create kv cache, warmup model\) took", "engine initialized"),
    (r"Starting vLLM server on|Application startup complete", "starting the API server"),
]

# spec setting (vllm.*) or plan value -> vLLM 0.32 flag. Adding a flag is one line.
FLAGS: list[FlagMap] = [
    FlagMap("tensor_parallel_size", "--tensor-parallel-size", plan="tensor_parallel_size"),
    FlagMap("pipeline_parallel_size", "--pipeline-parallel-size", plan="pipeline_parallel_size"),
    FlagMap("dtype", "--dtype"),
    FlagMap("gpu_memory_utilization", "--gpu-memory-utilization", plan="gpu_memory_utilization"),
    FlagMap("max_model_len", "--max-model-len", plan="max_model_len"),
    FlagMap("kv_cache_dtype", "--kv-cache-dtype"),
    FlagMap("quantization", "--quantization"),
    FlagMap("block_size", "--block-size"),
    FlagMap(
        "swap_space_gb",
        "--swap-space",
        "removed",
        note="vllm.swap_space_gb: vLLM 0.32 removed --swap-space (CPU swap for preempted requests); remove the setting",
    ),
    FlagMap("enforce_eager", "--enforce-eager", "bool_pair", negative="--no-enforce-eager"),
    FlagMap("enable_prefix_caching", "--enable-prefix-caching", "bool_pair", negative="--no-enable-prefix-caching"),
    FlagMap("enable_chunked_prefill", "--enable-chunked-prefill", "bool_pair", negative="--no-enable-chunked-prefill"),
    # the seed's --cuda-graph-sizes is --cudagraph-capture-sizes since vLLM 0.11
    FlagMap("cuda_graph_sizes", "--cudagraph-capture-sizes", "list_space"),
    FlagMap("max_num_seqs", "--max-num-seqs"),
    FlagMap("max_num_batched_tokens", "--max-num-batched-tokens"),
    FlagMap("trust_remote_code", "--trust-remote-code", "switch"),
]

RESERVED = ["--host", "--port", "--api-key", "--model", "--served-model-name", "--uds"]


def server_args(*, model_path: str, served_name: str, port: int, embed: bool) -> list[str]:
    args = ["--model", model_path, "--host", "0.0.0.0", "--port", str(port), "--served-model-name", served_name]
    if embed:
        args += ["--runner", "pooling"]  # vLLM 0.32's replacement for the seed's --task embed
    return args
