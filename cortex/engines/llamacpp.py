"""llama.cpp's llama-server: the flag table and the server command."""

from __future__ import annotations

from cortex.engines import FlagMap

ENGINE_LABEL = "llama-server"
FLAG_TABLE_ENGINE = "llama-server"  # name of the committed flag table (cortex/data/flags)
SECTION = "llamacpp"
PORT = 8080
STOP_TIMEOUT_S = 10  # the seed's graceful stop for llama.cpp (CPU offload cleanup takes longer)
API_KEY_ENV = "LLAMA_API_KEY"  # llama-server reads --api-key from this variable; keeps it off the command line
DEFAULT_IMAGE = "cortex/llamacpp-server"  # built from images/llamacpp, tagged with the toolchain version

# What llama-server says as it starts (its log), and the phase each line begins; in order.
# Checked against this toolchain's llama-server; older builds say "warming up the model".
STARTUP_PHASES: list[tuple[str, str]] = [
    (r"load_model: loading model", "loading model"),
    (r"load_model: initializing|warming up the model", "initializing slots"),
    (r"model loaded", "model loaded"),
    (r"listening on|server is listening", "listening"),
]

# spec setting (llamacpp.*) or plan value -> llama-server flag. Adding a flag is one line.
FLAGS: list[FlagMap] = [
    FlagMap("ngl", "-ngl", plan="ngl"),
    FlagMap("tensor_split", "-ts", "list_comma", plan="tensor_split"),
    FlagMap("split_mode", "-sm"),
    FlagMap("context_size", "-c", plan="context_total"),
    FlagMap("parallel", "-np", plan="parallel"),
    FlagMap("batch_size", "-b"),
    FlagMap("ubatch_size", "-ub"),
    FlagMap("threads", "-t"),
    FlagMap("rope_freq_base", "--rope-freq-base"),
    FlagMap("rope_freq_scale", "--rope-freq-scale"),
    FlagMap("flash_attention", "-fa"),
    # the seed's --mlock / --no-mmap are one flag in this llama.cpp: -lm/--load-mode
    FlagMap(
        "mlock",
        "-lm",
        derive=lambda s: load_mode(s.mlock, s.no_mmap),
        note="mlock and no_mmap become --load-mode (mmap+mlock, mlock, none)",
    ),
    FlagMap("numa", "--numa"),
    FlagMap("cache_type_k", "-ctk"),
    FlagMap("cache_type_v", "-ctv"),
    FlagMap("pooling", "--pooling"),
]


def load_mode(mlock: bool | None, no_mmap: bool | None) -> str | None:
    """The seed's two switches as llama-server's --load-mode value (None: leave the default)."""
    if mlock:
        return "mlock" if no_mmap else "mmap+mlock"
    if no_mmap:
        return "none"
    return None


# Flags Cortex sets itself; extra_args may not override them.
RESERVED = ["--host", "--port", "--api-key", "--api-key-file", "-m", "--alias", "-hf", "-mu", "--path"]


def server_args(*, model_path: str, served_name: str, port: int, embed: bool) -> list[str]:
    # --verbosity 4: this llama-server writes its buffer sizes (model, KV, compute), which
    # cortex.actual compares with the plan, only from level 4 ("trace"); it adds about 25 lines
    # per request to the log, none with the prompt or the answer.
    args = [
        "-m",
        model_path,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--alias",
        served_name,
        "--metrics",
        "--verbosity",
        "4",
    ]
    if embed:
        args.append("--embeddings")
    return args
