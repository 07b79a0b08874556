"""Load spec files: YAML with line numbers in, a `ModelSpec` or every problem out.

Each problem reads `FILE:LINE: field.path: message`, and the message says what to do:
unknown keys get a did-you-mean, YAML syntax errors point at the line, an empty file says
what a spec needs.

A spec may come from anyone, so loading it is bounded: a regular file of at most
MAX_SPEC_BYTES, YAML at most MAX_DEPTH deep, with at most MAX_ALIASES aliases and
MAX_NODES values once aliases are expanded (a "billion laughs" file is refused before it is
built), numbers of at most MAX_NUMBER_DIGITS digits, and every field bounded in cortex/spec.py.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cortex.fileio import UnreadableFile, read_regular_file
from cortex.spec import ModelSpec, short_repr

SPEC_SUFFIXES = (".yaml", ".yml")

MAX_SPEC_BYTES = 1 << 20  # 1 MiB; the example specs are under 2 KiB
MAX_DEPTH = 32  # nesting of mappings and lists; a spec needs 4
MAX_ALIASES = 100  # YAML `*alias` uses
MAX_NODES = 10_000  # values after alias expansion; a spec has a few dozen
MAX_NUMBER_DIGITS = 40  # an integer literal; Python refuses to parse more than 4300 digits, slowly
MAX_PROBLEMS = 50  # problems listed per file; the rest are counted


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class SpecError(Exception):
    """A spec file is invalid; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --------------------------------------------------------------------------- YAML with positions


class _Node:
    """A YAML mapping/sequence node's children with the line each key or item starts on."""

    def __init__(self, node: yaml.Node):
        self.node = node

    def child(self, key: Any) -> tuple[yaml.Node | None, int | None]:
        n = self.node
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if k.value == str(key):
                    return v, k.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(n.value):
            item = n.value[key]
            return item, item.start_mark.line + 1
        return None, None


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """The line of the deepest YAML node on `loc` that exists."""
    if root is None:
        return 1
    line = root.start_mark.line + 1
    node: yaml.Node | None = root
    for part in loc:
        if node is None:
            break
        child, child_line = _Node(node).child(part)
        if child_line is None:
            break
        node, line = child, child_line
    return line


# libyaml when it is there: the pure-Python parser takes seconds for a spec of a megabyte.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that refuses duplicate keys (plain YAML silently keeps the last one), keys
    that are not names, and integers too long to be a setting."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a key is a list or mapping; spec keys are plain names such as `name`", k.start_mark
            )
        key = loader.construct_object(k, deep=deep)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {short_repr(key)} is not a name; spec keys are words such as `name` "
                "(quote it if it is meant as text)",
                k.start_mark,
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key]}); keep one", k.start_mark
            )
        seen[key] = k.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    if len(str(node.value)) > MAX_NUMBER_DIGITS:
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"a number of {len(str(node.value))} digits; no setting needs more than {MAX_NUMBER_DIGITS}",
            node.start_mark,
        )
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _check_shape(text: str, filename: str, max_nodes: int = MAX_NODES) -> None:
    """Refuse YAML too deep or too large once aliases are expanded, from the event stream (the
    parser is iterative; PyYAML's composer recurses and would overflow the stack first)."""
    depth = 0
    expanded = 0
    aliases = 0
    anchored: dict[str, tuple[int, int]] = {}  # anchor -> (values inside, depth inside)
    open_: list[list[Any]] = []  # per open collection: [values so far, deepest inside, anchor]

    def fail(event: yaml.Event, message: str) -> SpecError:
        return SpecError([Problem(filename, event.start_mark.line + 1 if event.start_mark else 1, "(yaml)", message)])

    def add(values: int, inner: int) -> None:  # a finished child of the innermost open collection
        if open_:
            open_[-1][0] += values
            open_[-1][1] = max(open_[-1][1], 1 + inner)

    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise fail(event, f"nested more than {MAX_DEPTH} levels deep; a spec needs a few")
            open_.append([1, 1, event.anchor])
            expanded += 1
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            values, inner, anchor = open_.pop()
            if anchor:
                anchored[anchor] = (values, inner)
            add(values, inner)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                anchored[event.anchor] = (1, 0)
            expanded += 1
            add(1, 0)
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise fail(event, f"more than {MAX_ALIASES} aliases (*name); write the values out")
            values, inner = anchored.get(event.anchor or "", (1, 0))
            if depth + inner > MAX_DEPTH:
                raise fail(event, f"alias *{event.anchor} nests more than {MAX_DEPTH} levels deep")
            expanded += values
            add(values, inner)
        if expanded > max_nodes:
            raise fail(event, f"more than {max_nodes:,} values (aliases expanded); a spec has a few dozen")


# --------------------------------------------------------------------------- messages


def _model_at(loc: tuple[Any, ...], root: type[BaseModel] = ModelSpec) -> type[BaseModel] | None:
    """The pydantic model that the field at `loc` belongs to (for did-you-mean)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
        if nxt is None:
            return None
        model = nxt
    return model if isinstance(model, type) else None


def _message(err: dict[str, Any], root: type[BaseModel] = ModelSpec) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        parent = _model_at(tuple(loc[:-1]), root)
        key = str(loc[-1])
        if parent is not None:
            names = list(parent.model_fields)
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            if close:
                return f"unknown key {key!r}; did you mean {close[0]!r}?"
            return f"unknown key {key!r}; known keys here: {', '.join(names)}"
        return f"unknown key {key!r}"
    if kind == "missing":
        return "required; add it"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, ") :]
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error" or kind == "finite_number":
        got = err.get("input")
        if not isinstance(got, (dict, list)):
            msg += f" (got {short_repr(got)})"
    return msg


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("function-after", "function-before", "function-plain") or str(p).startswith(
            ("int", "list[", "literal[", "str", "float", "bool", "function")
        ):
            continue  # pydantic's union branch names, not fields
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(spec)"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        p
        for p in loc
        if not (
            isinstance(p, str)
            and (p.startswith(("function-", "list[", "literal[")) or p in ("int", "str", "float", "bool"))
        )
    )


# --------------------------------------------------------------------------- loading


_DEFAULTED_VAR = re.compile(r"\$\{(\w+):-([^}]*)\}")
_ANY_VAR = re.compile(r"\$\{?([A-Za-z_]\w*)")
# Variables a path never expands: their value would be printed in every "not found" message.
SECRET_VAR = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)


class SecretVariable(ValueError):
    """A path refers to an environment variable whose name says it holds a secret."""


def expand_path(value: str) -> str:
    """`${VAR:-default}` (the default when VAR is unset or empty, as in a shell), then `~`, then
    `$VAR`/`${VAR}`: a spec can name a file under the cache wherever `CORTEX_CACHE` puts it.
    A variable named like a secret (HF_TOKEN, *_KEY, *SECRET*, *PASSWORD*, ...) is refused,
    never expanded: a path ends up in messages and logs."""
    secret = sorted({m[1] for m in _ANY_VAR.finditer(value) if SECRET_VAR.search(m[1])})
    if secret:
        raise SecretVariable(
            f"refers to ${secret[0]}, whose name says it holds a secret; Cortex does not expand secrets into "
            "paths (they would show in messages and logs): write the path out or use another variable"
        )
    value = _DEFAULTED_VAR.sub(lambda m: os.environ.get(m[1]) or m[2], value)
    return os.path.expandvars(os.path.expanduser(value))


def _resolve_paths(data: dict[str, Any], base: Path) -> list[tuple[tuple[str, str], str]]:
    """Local paths in a spec are relative to the spec file; ~, $VARS and ${VAR:-default} expand.
    Returns the problems as (location, message)."""
    src = data.get("source")
    if not isinstance(src, dict):
        return []
    problems: list[tuple[tuple[str, str], str]] = []
    for key in _local_path_keys(src):
        value = src.get(key)
        if isinstance(value, str) and value and "\x00" not in value:
            try:
                p = Path(expand_path(value))
            except SecretVariable as e:
                problems.append((("source", key), str(e)))
                continue
            # normpath, not resolve(): the path stays the one written (a symlink into the HF cache
            # keeps its .gguf name), and loading reads no file system (a symlink loop is the
            # reader's to report, naming the file).
            src[key] = os.path.normpath(p if p.is_absolute() else base / p)
    return problems


def _local_path_keys(src: dict[str, Any]) -> list[str]:
    """The keys of a spec's `source` that name a local path (`gguf` is a file name in a repo)."""
    return ["path"] + (["gguf"] if not src.get("repo") else [])


def relative_path_problems(text: str, filename: str) -> list[Problem]:
    """A spec's local paths that are relative to its folder, as problems: a spec applied to the
    fleet travels to each host as text, and no host has the folder the spec came from. A path
    that starts with / is kept; ~ and $VARS expand here, and again on each host."""
    data, root = read_yaml(text, filename)
    src = data.get("source") if isinstance(data, dict) else None
    if not isinstance(src, dict):
        return []
    problems = []
    for key in _local_path_keys(src):
        value = src.get(key)
        if not isinstance(value, str) or not value or "\x00" in value:
            continue  # not a path: validation says what is wrong with it
        try:
            expanded = expand_path(value)
        except SecretVariable:
            continue  # parse_spec_text says why
        if not Path(expanded).is_absolute():
            problems.append(
                Problem(
                    filename,
                    _line_of(root, ("source", key)),
                    f"source.{key}",
                    f"{short_repr(value)} is relative to the spec's folder, which the fleet's hosts do not "
                    "have (each host gets the spec's text); write an absolute path, or one that starts "
                    "with ~ or ${VAR} for a folder each host has",
                )
            )
    return problems


def fleet_spec_text(path: str | Path) -> str:
    """The text of the spec file at `path`, to send to the fleet's hosts: SpecError when it is
    no spec file, or when a local path in it is relative (relative_path_problems)."""
    text = read_checked_text(
        path, MAX_SPEC_BYTES, "a spec is a YAML file", "name a spec file (or use `cortex validate FOLDER`)"
    )
    problems = relative_path_problems(text, str(path))
    if problems:
        raise SpecError(problems)
    return text


def read_yaml(text: str, filename: str, max_nodes: int = MAX_NODES) -> tuple[Any, yaml.Node | None]:
    """The document and its root node (for line numbers), from YAML (or JSON) of bounded shape,
    duplicate keys refused; SpecError with the line of a syntax error."""
    try:
        _check_shape(text, filename, max_nodes)
        loader = _UniqueKeyLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = e.problem or str(e)
        raise SpecError(
            [Problem(filename, line, "(yaml)", f"YAML syntax error: {what}; fix the YAML at this line")]
        ) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(filename, 1, "(yaml)", f"YAML error: {e}")]) from None
    return data, root


def validation_problems(
    error: ValidationError, filename: str, root_node: yaml.Node | None, root_model: type[BaseModel] = ModelSpec
) -> SpecError:
    """Every problem pydantic found, as `FILE:LINE: field: message`, in line order, at most MAX_PROBLEMS."""
    problems: list[Problem] = []
    for err in error.errors():
        loc = _clean_loc(tuple(err["loc"]))
        problems.append(
            Problem(filename, _line_of(root_node, loc), _field_path(loc), _message({**err, "loc": loc}, root_model))
        )
    problems.sort(key=lambda p: p.line)
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - MAX_PROBLEMS
        problems = problems[:MAX_PROBLEMS] + [
            Problem(filename, problems[MAX_PROBLEMS].line, "(spec)", f"{more} more problems not shown; fix these first")
        ]
    return SpecError(problems)


def parse_spec_text(text: str, filename: str, base: Path | None = None) -> ModelSpec:
    data, root = read_yaml(text, filename)
    if data is None:
        raise SpecError(
            [Problem(filename, 1, "(spec)", "the file is empty; a spec needs at least `name` and `source`")]
        )
    if not isinstance(data, dict):
        raise SpecError(
            [
                Problem(
                    filename,
                    1,
                    "(spec)",
                    f"a spec is a mapping of keys (name, source, ...), not a {type(data).__name__}",
                )
            ]
        )
    if base is not None:
        path_problems = _resolve_paths(data, base)
        if path_problems:
            raise SpecError(
                [Problem(filename, _line_of(root, loc), _field_path(loc), msg) for loc, msg in path_problems]
            )
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        raise validation_problems(e, filename, root) from None


def read_checked_text(path: str | Path, limit: int, what: str, folder_hint: str = "") -> str:
    """A spec-like file's text, or SpecError (`FILE:1: (file): ...`) saying why it is not one:
    missing, a folder, not a regular file, over `limit` bytes, not UTF-8. `what` says what the
    file should be ("a spec is a YAML file"); `folder_hint` what to do when a folder is named."""
    path = Path(path)

    def problem(message: str) -> SpecError:
        return SpecError([Problem(str(path), 1, "(file)", message)])

    try:
        data = read_regular_file(path, limit=limit)
    except UnreadableFile as e:
        if str(e) == "no such file":
            raise problem("no such file; check the path") from None
        if str(e).startswith("is a folder") and folder_hint:
            raise problem(f"is a folder; {folder_hint}") from None
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit // 1024} KiB"
        raise problem(f"{e}; {what} of at most {size}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise problem(f"is not UTF-8 text; {what}") from None


def load_spec(path: str | Path) -> ModelSpec:
    text = read_checked_text(
        path, MAX_SPEC_BYTES, "a spec is a YAML file", "name a spec file (or use `cortex validate FOLDER`)"
    )
    return parse_spec_text(text, str(path), base=Path(os.path.realpath(path)).parent)


def spec_files(paths: Sequence[str | Path]) -> list[Path]:
    """Spec files named directly, or found in named folders (*.yaml, *.yml; not recursing into hub/)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix in SPEC_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out
