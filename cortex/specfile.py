"""Load spec files: YAML with line numbers in, a `ModelSpec` or every problem out.

Each problem reads `FILE:LINE: field.path: message`, and the message says what to do:
unknown keys get a did-you-mean, YAML syntax errors point at the line, an empty file says
what a spec needs.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cortex.spec import ModelSpec

SPEC_SUFFIXES = (".yaml", ".yml")


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key]}); keep one", k.start_mark
            )
        seen[key] = k.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# --------------------------------------------------------------------------- messages


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that the field at `loc` belongs to (for did-you-mean)."""
    model: Any = ModelSpec
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


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        parent = _model_at(tuple(loc[:-1]))
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
        msg = msg[len("Value error, "):]
    if msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, "):]
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        got = err.get("input")
        if not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
    return msg


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("function-after", "function-before", "function-plain") or str(p).startswith(("int", "list[", "literal[", "str", "float", "bool", "function")):
            continue  # pydantic's union branch names, not fields
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(spec)"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and (p.startswith(("function-", "list[", "literal[")) or p in ("int", "str", "float", "bool"))))


# --------------------------------------------------------------------------- loading


_DEFAULTED_VAR = re.compile(r"\$\{(\w+):-([^}]*)\}")


def expand_path(value: str) -> str:
    """`${VAR:-default}` (the default when VAR is unset or empty, as in a shell), then `~`, then
    `$VAR`/`${VAR}`: a spec can name a file under the cache wherever `CORTEX_CACHE` puts it."""
    value = _DEFAULTED_VAR.sub(lambda m: os.environ.get(m[1]) or m[2], value)
    return os.path.expandvars(os.path.expanduser(value))


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Local paths in a spec are relative to the spec file; ~, $VARS and ${VAR:-default} expand."""
    src = data.get("source")
    if not isinstance(src, dict):
        return
    keys = ["path"] + (["gguf"] if not src.get("repo") else [])
    for key in keys:
        value = src.get(key)
        if isinstance(value, str) and value:
            p = Path(expand_path(value))
            src[key] = str(p if p.is_absolute() else (base / p).resolve())


def parse_spec_text(text: str, filename: str, base: Path | None = None) -> ModelSpec:
    problems: list[Problem] = []
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = e.problem or str(e)
        raise SpecError([Problem(filename, line, "(yaml)", f"YAML syntax error: {what}; fix the YAML at this line")]) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(filename, 1, "(yaml)", f"YAML error: {e}")]) from None
    if data is None:
        raise SpecError([Problem(filename, 1, "(spec)", "the file is empty; a spec needs at least `name` and `source`")])
    if not isinstance(data, dict):
        raise SpecError([Problem(filename, 1, "(spec)", f"a spec is a mapping of keys (name, source, ...), not a {type(data).__name__}")])
    if base is not None:
        _resolve_paths(data, base)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = _clean_loc(tuple(err["loc"]))
            problems.append(Problem(filename, _line_of(root, loc), _field_path(loc), _message({**err, "loc": loc})))
    raise SpecError(sorted(problems, key=lambda p: p.line))


def load_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([Problem(str(path), 1, "(file)", "no such file; check the path")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(str(path), 1, "(file)", "is a folder; name a spec file (or use `cortex validate FOLDER`)")]) from None
    except UnicodeDecodeError:
        raise SpecError([Problem(str(path), 1, "(file)", "is not UTF-8 text; a spec is a YAML file")]) from None
    return parse_spec_text(text, str(path), base=path.resolve().parent)


def spec_files(paths: list[str | Path]) -> list[Path]:
    """Spec files named directly, or found in named folders (*.yaml, *.yml; not recursing into hub/)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix in SPEC_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out
