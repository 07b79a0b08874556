"""The engines Cortex runs, each described by one declarative flag table.

`cortex.engines.llamacpp.FLAGS` and `cortex.engines.vllm.FLAGS` map spec settings and plan
values to engine flags; `build_args` turns a table into a command-line list. Every flag an
engine version accepts is committed data (cortex/data/flags, made from the engines
themselves), so the emitted command and a spec's `extra_args` are checked with no engine
installed; `cortex.engines.extra_args` holds the reviewed allow-list those extra_args must pass.
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
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and not is_number(a)]


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def startup_phase(engine: str, logs: str) -> str | None:
    """The phase an engine's start has reached, from the last line of `logs` (its recent
    output) that its STARTUP_PHASES table knows; None before the first such line."""
    table = [(re.compile(pattern), phase) for pattern, phase in engine_module(engine).STARTUP_PHASES]
    for line in reversed(logs.splitlines()):
        for pattern, phase in table:
            if pattern.search(line):
                return phase
    return None


def engine_module(engine: str) -> ModuleType:
    if engine == "vllm":
        from cortex.engines import vllm

        return vllm
    if engine == "llamacpp":
        from cortex.engines import llamacpp

        return llamacpp
    raise FlagError(f"unknown engine {engine!r}")
