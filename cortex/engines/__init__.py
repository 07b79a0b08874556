"""The engines Cortex runs, each described by one declarative flag table.

`cortex.engines.llamacpp.FLAGS` and `cortex.engines.vllm.FLAGS` map spec settings and plan
values to engine flags; `build_args` turns a table into a command-line list. Every flag an
engine version accepts is committed data (cortex/data/flags, made from the engines
themselves), so the emitted command and a spec's `extra_args` are checked with no engine
installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Literal

Kind = Literal["value", "switch", "bool_pair", "list_comma", "list_space", "removed"]


class FlagError(ValueError):
    """A flag the target engine version does not accept, or one Cortex must set itself."""


@dataclass(frozen=True)
class FlagMap:
    """One spec setting (or planned value) and the flag that carries it."""

    setting: str  # the field in the engine's spec section (vllm.* / llamacpp.*)
    flag: str  # the spelling Cortex emits
    kind: Kind = "value"
    plan: str | None = None  # take the value from this Plan attribute instead (the plan honours the spec)
    negative: str | None = None  # bool_pair: the flag for False
    note: str = ""  # why, for a renamed or removed flag
    derive: Callable[[Any], Any] | None = None  # value computed from the settings (a translated flag)


def render(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def build_args(table: list[FlagMap], settings: Any, plan: Any) -> list[str]:
    """The flags for every setting that has a value, in table order."""
    args: list[str] = []
    for m in table:
        if m.derive:
            value = m.derive(settings)
        else:
            value = getattr(plan, m.plan) if m.plan else getattr(settings, m.setting)
        if value is None:
            continue
        if m.kind == "removed":
            raise FlagError(m.note)
        if m.kind == "value":
            args += [m.flag, render(value)]
        elif m.kind == "switch":
            if value:
                args.append(m.flag)
        elif m.kind == "bool_pair":
            if value:
                args.append(m.flag)
            elif m.negative is not None:
                args.append(m.negative)
            else:  # a table error: every bool_pair names its negative flag
                raise FlagError(f"{m.flag} has no negative flag to turn {m.setting} off")
        elif m.kind == "list_comma":
            args += [m.flag, ",".join(render(v) for v in value)]
        elif m.kind == "list_space":
            args += [m.flag, *(render(v) for v in value)]
    return args


def flag_names(args: list[str]) -> list[str]:
    """The flags in an argument list (`--x=1` counts as `--x`); values are skipped."""
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and not _is_number(a)]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def check_extra_args(args: list[str], engine: str) -> list[str]:
    """Validate a spec's extra_args for `engine` ("vllm" | "llamacpp"): every flag must exist in
    the engine version Cortex targets, and none may take over what Cortex sets itself."""
    from cortex.engines.introspect import FlagTableMissing, load_flag_table

    module = _module(engine)
    try:
        table = load_flag_table(module.FLAG_TABLE_ENGINE)
    except FlagTableMissing as e:
        raise FlagError(str(e)) from None
    reserved = {}
    for name in module.RESERVED:
        info = table.by_name.get(name)
        for spelling in info.names if info else (name,):
            reserved[spelling] = name
    mapped = {}
    for m in module.FLAGS:
        if m.kind == "removed":
            continue
        info = table.by_name.get(m.flag)
        for spelling in info.names if info else (m.flag,):
            mapped[spelling] = m.setting
        if m.negative:
            mapped[m.negative] = m.setting
    for a in args:
        if not a.startswith("-") or _is_number(a):
            continue
        name = _spelling(a.split("=", 1)[0], table.by_name)
        if name in reserved:
            raise FlagError(f"{name} is set by Cortex (host, port, API key, model and name come from the spec and plan); remove it")
        if name in mapped:
            raise FlagError(f"{name} has a spec setting: use {module.SECTION}.{mapped[name]} instead of extra_args")
        if name not in table.by_name:
            import difflib

            close = difflib.get_close_matches(name, list(table.by_name), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise FlagError(f"{name} is not a flag of {module.ENGINE_LABEL} {table.version}{hint}")
    return args


def _spelling(name: str, known: dict) -> str:
    """The table's spelling of a flag: argparse (vLLM) also accepts `--max_num_seqs` and dotted
    keys of a JSON option (`--compilation-config.level`)."""
    if name in known:
        return name
    dashed = name[:2] + name[2:].replace("_", "-") if name.startswith("--") else name
    if dashed in known:
        return dashed
    head = dashed.split(".", 1)[0]
    return head if "." in dashed and head in known else name


def startup_phase(engine: str, logs: str) -> str | None:
    """The phase an engine's start has reached, from the last line of `logs` (its recent
    output) that its STARTUP_PHASES table knows; None before the first such line."""
    table = [(re.compile(pattern), phase) for pattern, phase in _module(engine).STARTUP_PHASES]
    for line in reversed(logs.splitlines()):
        for pattern, phase in table:
            if pattern.search(line):
                return phase
    return None


def _module(engine: str) -> ModuleType:
    if engine == "vllm":
        from cortex.engines import vllm

        return vllm
    if engine == "llamacpp":
        from cortex.engines import llamacpp

        return llamacpp
    raise FlagError(f"unknown engine {engine!r}")
