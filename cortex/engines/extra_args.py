"""Which engine flags a spec's `extra_args` may carry: an allow-list per engine version.

Every flag of an engine version (the committed flag table, read from the engine's own parser)
has a reviewed class in `cortex/data/flags/<engine>-<version>.extra-args.yaml`. Only `safe`
flags pass. The others are refused with their class and reason: they write files, run tools,
reach other machines, read options from a file around this check, bind the network, or read
files on the engine's machine. A spec that truly needs one sets `unsafe_extra_args: true` in
its engine section; the plan then names each such flag loudly (`cortex plan`, the Prefect
report). Flags Cortex sets itself, flags with a spec setting, flags the engine version does
not have and bare positional arguments are refused even then.

`cortex engines dump-flags` drafts the file for a new engine version: classes carry over by
flag name from the newest reviewed file of that engine, and a new flag comes out `unreviewed`
(refused) until someone classifies it. A test keeps the file, the table and the real engines
in step.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import yaml

from cortex.engines import FlagError, engine_module, is_number
from cortex.engines.introspect import FLAGS_DATA_DIR, FlagInfo, FlagTable, FlagTableMissing, load_flag_table

# The vocabulary of classes and why each is refused. "safe" passes; the rest need the escape.
CLASSES: dict[str, str] = {
    "safe": "",
    "file-write": "it writes files on the engine's machine, as the engine's user, at a path the spec names",
    "file-read": (
        "it reads a file or folder the spec names on the engine's machine (as the engine's user); "
        "its content can come back through the API or the logs, and the docker runtime does not mount it"
    ),
    "tool-execution": "it lets the engine run tools, shell commands or code it loads (tools, MCP servers, plugins, classes)",
    "remote-backend": (
        "it makes the engine contact other machines (RPC backends, downloads, telemetry, multi-node "
        "or KV-transfer peers)"
    ),
    "config-file": "it reads more options from a file, around this check (host, port, API key included)",
    "network": "it binds, exposes or opens the engine's network surface beyond the one port Cortex publishes",
    "admin-api": "it opens an endpoint that changes the running server through its API",
    "exits": "it makes the engine print something and exit instead of serving",
    "removed": "the engine version itself says the flag has been removed",
    "set-by-cortex": "Cortex sets it from the spec and plan (host, port, API key, model and served name)",
    "unreviewed": "no one has reviewed this flag of this engine version yet",
}
# Refused even with unsafe_extra_args: Cortex needs them, or they cannot work at all.
ALWAYS_REFUSED = {"set-by-cortex", "removed", "exits"}


@dataclass(frozen=True)
class FlagPolicy:
    """One flag's reviewed class, an optional note, and for a JSON-valued option the keys that
    are safe to set (anything else in it is refused with the flag's class)."""

    klass: str
    why: str = ""
    safe_keys: tuple[str, ...] | None = None  # a JSON option: these keys pass
    safe_values: tuple[str, ...] | None = None  # these values pass; any other gets the class

    @property
    def reason(self) -> str:
        return CLASSES[self.klass] + (f"; {self.why}" if self.why else "")


@dataclass(frozen=True)
class ExtraArgsPolicy:
    engine: str  # the flag table's engine name: llama-server | vllm
    version: str
    flags: dict[str, FlagPolicy]  # by canonical spelling (FlagInfo.canonical)

    def of(self, info: FlagInfo) -> FlagPolicy:
        return self.flags.get(info.canonical, FlagPolicy("unreviewed"))


@dataclass(frozen=True)
class Refusal:
    """An argument the allow-list refuses, and why."""

    arg: str  # as written in the spec, e.g. "--log-file" or "--compilation-config.cache_dir"
    klass: str
    reason: str

    def __str__(self) -> str:
        return f"{self.arg} ({self.klass}: {self.reason})"


@dataclass
class CheckedArgs:
    """What the allow-list found in one extra_args list."""

    errors: list[str] = field(default_factory=list)  # refused whatever the spec says
    unsafe: list[Refusal] = field(default_factory=list)  # refused unless unsafe_extra_args


# --------------------------------------------------------------------------- the committed files


def policy_path(engine: str, version: str) -> Path:
    return FLAGS_DATA_DIR / f"{engine}-{version}.extra-args.yaml"


def load_policy(engine: str, version: str) -> ExtraArgsPolicy:
    path = policy_path(engine, version)
    if not path.is_file():
        raise FlagTableMissing(
            f"no reviewed extra_args allow-list for {engine} {version} ({path.name}); run "
            "`cortex engines dump-flags`, review the classes it drafts, and commit the file"
        )
    data = yaml.safe_load(path.read_text())
    flags: dict[str, FlagPolicy] = {}
    for name, entry in (data.get("flags") or {}).items():
        if isinstance(entry, str):
            entry = {"class": entry}
        klass = entry["class"]
        if klass not in CLASSES:
            raise ValueError(f"{path}: {name}: unknown class {klass!r}; one of {', '.join(CLASSES)}")
        keys, values = entry.get("safe_keys"), entry.get("safe_values")
        flags[name] = FlagPolicy(
            klass,
            entry.get("why", ""),
            tuple(keys) if keys is not None else None,
            tuple(values) if values is not None else None,
        )
    return ExtraArgsPolicy(engine=data["engine"], version=str(data["version"]), flags=flags)


def write_policy(policy: ExtraArgsPolicy, table: FlagTable) -> Path:
    """The policy as YAML, one line per flag in the table's order, each with its help as a comment."""
    label = {"llama-server": "llamacpp", "vllm": "vllm"}.get(policy.engine, policy.engine)
    lines = [
        f"# Which {policy.engine} {policy.version} flags a spec's {label}.extra_args may carry.",
        "# Drafted by `cortex engines dump-flags` from the engine's own flag list, then reviewed by hand:",
        "# `safe` passes; every other class (cortex/engines/extra_args.py: CLASSES) is refused with its",
        "# reason unless the spec sets unsafe_extra_args: true. `unreviewed` is refused until classified.",
        f"engine: {policy.engine}",
        f"version: {json.dumps(policy.version)}",
        "flags:",
    ]
    for info in sorted(table.flags, key=lambda f: f.canonical):
        p = policy.of(info)
        if p.why or p.safe_keys is not None or p.safe_values is not None:
            entry: dict[str, object] = {"class": p.klass}
            if p.why:
                entry["why"] = p.why
            if p.safe_keys is not None:
                entry["safe_keys"] = list(p.safe_keys)
            if p.safe_values is not None:
                entry["safe_values"] = list(p.safe_values)
            value = json.dumps(entry)
        else:
            value = p.klass
        lines.append(f"  {json.dumps(info.canonical)}: {value}  # {info.help[:90]}".rstrip())
    path = policy_path(policy.engine, policy.version)
    path.write_text("\n".join(lines) + "\n")
    return path


def draft_policy(table: FlagTable) -> ExtraArgsPolicy:
    """The policy for `table`'s engine version: its own reviewed file if there is one, else the
    newest reviewed file of the same engine; flags neither knows come out `unreviewed`."""
    previous: dict[str, FlagPolicy] = {}
    own = policy_path(table.engine, table.version)
    sources = (
        [own]
        if own.is_file()
        else sorted(FLAGS_DATA_DIR.glob(f"{table.engine}-*.extra-args.yaml"), key=lambda p: p.stat().st_mtime)[-1:]
    )
    for path in sources:
        version = path.name[len(table.engine) + 1 : -len(".extra-args.yaml")]
        previous = load_policy(table.engine, version).flags
    flags = {f.canonical: previous.get(f.canonical, FlagPolicy("unreviewed")) for f in table.flags}
    return ExtraArgsPolicy(table.engine, table.version, flags)


def policy_problems(table: FlagTable) -> list[str]:
    """What keeps the committed allow-list of `table`'s version from covering it exactly: a
    missing file, a flag without a reviewed class, a classified flag the engine does not have."""
    try:
        policy = load_policy(table.engine, table.version)
    except FlagTableMissing as e:
        return [str(e)]
    names = {f.canonical for f in table.flags}
    problems = [f"{n}: not classified" for n in sorted(names - policy.flags.keys())]
    problems += [
        f"{n}: unreviewed" for n in sorted(names & policy.flags.keys()) if policy.flags[n].klass == "unreviewed"
    ]
    problems += [
        f"{n}: classified, but {table.engine} {table.version} has no such flag"
        for n in sorted(policy.flags.keys() - names)
    ]
    # A flag with a spec setting is refused in extra_args whatever its class: its entry says so,
    # so the list does not read as if the flag passed.
    module = engine_module({"llama-server": "llamacpp"}.get(table.engine, table.engine))
    problems += [
        f"{n}: has the spec setting {module.SECTION}.{setting}; its entry must say "
        f'{{"class": ..., "why": "{SPEC_SETTING_WHY}"}}'
        for n, setting in sorted(_mapped_settings(module, table).items())
        if n in policy.flags and n in names and policy.flags[n].why != SPEC_SETTING_WHY
    ]
    return problems


SPEC_SETTING_WHY = "has a spec setting, so extra_args refuse it and name the setting"


# --------------------------------------------------------------------------- the check


def check_extra_args(args: list[str], engine: str, *, unsafe: bool = False) -> CheckedArgs:
    """Classify a spec's extra_args for `engine` ("vllm" | "llamacpp") against the allow-list of
    the engine version Cortex targets. Raises FlagError when the spec must change: an argument
    refused whatever the spec says, or a refused class without `unsafe`. Returns what passed
    only because of `unsafe` (the plan shows it)."""
    checked = classify_extra_args(args, engine)
    module = engine_module(engine)
    problems = list(checked.errors)
    if checked.unsafe and not unsafe:
        problems += [f"{r.arg} is refused: {r.klass}: {r.reason}" for r in checked.unsafe]
        problems.append(
            f"remove {'it' if len(checked.unsafe) == 1 else 'them'}, or set "
            f"{module.SECTION}.unsafe_extra_args: true to pass {'it' if len(checked.unsafe) == 1 else 'them'} anyway "
            "(the plan then shows it as UNSAFE)"
        )
    if problems:
        raise FlagError("; ".join(problems))
    return checked


def classify_extra_args(args: list[str], engine: str) -> CheckedArgs:
    """Walk the arguments as the engine's parser would (each flag with its values) and sort what
    is refused into errors (never allowed) and unsafe (allowed only by the escape)."""
    module = engine_module(engine)
    try:
        table = load_flag_table(module.FLAG_TABLE_ENGINE)
        policy = load_policy(table.engine, table.version)
    except FlagTableMissing as e:
        raise FlagError(str(e)) from None
    label = f"{module.ENGINE_LABEL} {table.version}"
    reserved = {s for name in module.RESERVED for s in _spellings(name, table)}
    mapped = _mapped_settings(module, table)
    out = CheckedArgs()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg == "-" or is_number(arg):
            out.errors.append(
                f"{arg!r} is a bare positional argument; {label} takes none (Cortex names the model "
                "itself): write flags, each followed by its value"
            )
            continue
        written, has_inline, inline = arg.partition("=")
        name, key = _spelling(written, table)
        info = table.by_name.get(name)
        if info is None:
            close = difflib.get_close_matches(name, list(table.by_name), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            out.errors.append(f"{written} is not a flag of {label} (unknown flag){hint}")
            continue
        values, i = _values(info, args, i, inline if has_inline else None)
        if values is None:
            out.errors.append(f"{written} needs a value ({info.metavar or 'VALUE'})")
            continue
        if name in reserved:
            out.errors.append(
                f"{written} is set by Cortex (host, port, API key, model and name come from the spec "
                "and plan); remove it"
            )
            continue
        if name in mapped:
            out.errors.append(
                f"{written} has a spec setting: use {module.SECTION}.{mapped[name]} instead of extra_args"
            )
            continue
        p = policy.of(info)
        if p.klass in ALWAYS_REFUSED:
            out.errors.append(f"{written} is refused: {p.klass}: {p.reason}")
        elif p.safe_keys is not None:
            bad = _unsafe_keys(key, values, p.safe_keys)
            if bad:
                out.unsafe.append(
                    Refusal(
                        arg,
                        p.klass if p.klass != "safe" else "unreviewed",
                        f"only these keys of {info.canonical} are reviewed as safe: {', '.join(p.safe_keys)}; "
                        f"this sets {', '.join(bad)}" + (f" ({p.reason})" if p.klass != "safe" else ""),
                    )
                )
        elif p.safe_values is not None and values and all(v in p.safe_values for v in values):
            pass
        elif p.klass != "safe":
            out.unsafe.append(Refusal(written, p.klass, p.reason))
    return out


def unsafe_extra_args(args: list[str], engine: str) -> list[str]:
    """What passes only because of unsafe_extra_args, one line each (for the plan)."""
    return [str(r) for r in classify_extra_args(args, engine).unsafe]


def _values(info: FlagInfo, args: list[str], i: int, inline: str | None) -> tuple[list[str] | None, int]:
    """The values that follow a flag (the flag's nargs), and the index after them; None when a
    required value is missing."""
    if inline is not None:
        return [inline], i
    if not info.takes_value:
        return [], i
    nargs = info.nargs
    if nargs in ("+", "*"):
        start = i
        while i < len(args) and (not args[i].startswith("-") or is_number(args[i])):
            i += 1
        if nargs == "+" and i == start:
            return None, i
        return args[start:i], i
    if nargs == "?" or info.value_optional:
        if i < len(args) and (not args[i].startswith("-") or is_number(args[i])):
            return [args[i]], i + 1
        return [], i
    count = int(nargs) if nargs and nargs.isdigit() else 1
    if i + count > len(args):
        return None, len(args)
    return args[i : i + count], i + count


def _unsafe_keys(key: str | None, values: list[str], safe: tuple[str, ...]) -> list[str]:
    """Keys of a JSON option that are not reviewed: `--x.key v` names one, `--x '{...}'` several."""
    if key is not None:
        head = key.split(".", 1)[0]
        return [] if head in safe else [head]
    keys: list[str] = []
    for value in values:
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            return ["<not JSON>"]
        if not isinstance(data, dict):
            return ["<not JSON>"]
        keys += [k for k in data if k not in safe]
    return keys


def _spelling(name: str, table: FlagTable) -> tuple[str, str | None]:
    """The table's spelling of a flag, and the dotted key of a JSON option if one is given:
    argparse (vLLM) also accepts `--max_num_seqs` and `--compilation-config.mode`."""
    known = table.by_name
    if name in known:
        return name, None
    dashed = name[:2] + name[2:].replace("_", "-") if name.startswith("--") else name
    if dashed in known:
        return dashed, None
    head, dot, rest = name.partition(".")
    head_dashed = head[:2] + head[2:].replace("_", "-") if head.startswith("--") else head
    if dot and head_dashed in known:
        return head_dashed, rest
    return name, None


def _spellings(name: str, table: FlagTable) -> tuple[str, ...]:
    info = table.by_name.get(name)
    return info.names if info else (name,)


def _mapped_settings(module: ModuleType, table: FlagTable) -> dict[str, str]:
    mapped: dict[str, str] = {}
    for m in module.FLAGS:
        if m.kind == "removed":
            continue
        for spelling in _spellings(m.flag, table):
            mapped[spelling] = m.setting
        if m.negative:
            for spelling in _spellings(m.negative, table):
                mapped[spelling] = m.setting
    return mapped


# --------------------------------------------------------------------------- the spec's env

# What a spec's engine `env` may set: tuning variables of the engine and the libraries it runs
# on. The engine otherwise starts with a minimal environment (cortex.runtime.base:
# engine_environment), so these are the only variables of the operator's choosing it sees.
ENV_PREFIXES = ("OMP_", "KMP_", "MKL_", "OPENBLAS_", "GOMP_", "NCCL_", "CUDA_", "GGML_", "VLLM_", "TORCH_", "PYTORCH_")
ENV_NAMES = {"TZ"}
# Inside those prefixes, refused: what Cortex sets, and what loads code, opens the network or
# reads or writes files the spec names (vLLM's plugins, dev endpoints, ports, config and caches).
ENV_REFUSED: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "Cortex sets it from the plan's GPUs (resources.gpus)",
    "VLLM_API_KEY": "Cortex sets the engine's API key",
    "VLLM_CPU_KVCACHE_SPACE": "the plan sets it (vLLM on CPU)",
    "VLLM_PLUGINS": "it loads Python plugins into the engine",
    "VLLM_SERVER_DEV_MODE": "it opens development endpoints that change the running server",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "it lets API callers load LoRA adapters from paths at run time",
    "VLLM_HOST_IP": "it changes the address vLLM's workers bind and announce",
    "VLLM_PORT": "it changes the ports vLLM's workers bind",
    "VLLM_RPC_BASE_PATH": "it changes where vLLM's IPC sockets are written",
    "VLLM_LOGGING_CONFIG_PATH": "it reads a logging config file (handlers can write files)",
    "VLLM_CACHE_ROOT": "it moves vLLM's cache writes to a path the spec names",
    "VLLM_CONFIG_ROOT": "it reads vLLM config from a path the spec names",
    "VLLM_ASSETS_CACHE": "it moves vLLM's asset downloads to a path the spec names",
    "VLLM_USE_MODELSCOPE": "it makes vLLM download from ModelScope",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "it lets vLLM unpickle data it receives",
    "TORCH_HOME": "it moves torch's cache writes to a path the spec names",
    "TORCHINDUCTOR_CACHE_DIR": "it moves torch's compile cache to a path the spec names",
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_engine_env(env: dict[str, str]) -> dict[str, str]:
    """Refuse what a spec's engine `env` may not set (FlagError naming each variable and why)."""
    problems = []
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            problems.append(f"{name!r} is not an environment variable name (letters, digits, _)")
        elif any(word in name.upper() for word in ("TOKEN", "SECRET", "PASSWORD")):
            problems.append(
                f"{name}: secrets do not belong in a spec, and the engine needs none: it serves the "
                "files `cortex prepare` made (no Hub token)"
            )
        elif name in ENV_REFUSED:
            problems.append(f"{name}: {ENV_REFUSED[name]}")
        elif name.startswith("LLAMA_ARG_"):
            problems.append(
                f"{name} is a llama-server flag by another name: write the flag in extra_args, "
                "where the allow-list checks it"
            )
        elif not (name in ENV_NAMES or name.startswith(ENV_PREFIXES)):
            problems.append(
                f"{name} is not a variable a spec may give the engine (allowed: TZ and names "
                f"starting {', '.join(ENV_PREFIXES)})"
            )
    if problems:
        raise FlagError("; ".join(problems))
    return env
