"""The layers stay apart: the core (`cortex/`) imports neither Prefect nor the layers built on
it (`flows/`, `tasks/`, the command line `cli/`), so it can be used, tested and reasoned about
without them."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "cortex"
FORBIDDEN = ("prefect", "flows", "tasks", "cli")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_the_core_imports_no_prefect_flows_tasks_or_cli() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 40  # the scan really reads the core
    offending = [
        f"{path.relative_to(CORE.parent)}:{line}: import {name}"
        for path in files
        for line, name in _imports(path)
        if name.split(".")[0] in FORBIDDEN
    ]
    assert offending == [], "\n".join(offending)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an import names, with relative imports resolved against `path`'s package."""
    if node.level == 0:
        return node.module or ""
    package = list(path.relative_to(CORE.parent).with_suffix("").parts)[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_the_runtime_never_imports_the_test_support_package() -> None:
    """cortex/testing (the fake engine, a gateway process for tests) ships with the package for
    tests and benchmarks only; nothing that runs in production (the core, flows, tasks, the
    command line) may depend on it."""
    runtime = [p for p in sorted(CORE.rglob("*.py")) if "testing" not in p.relative_to(CORE).parts]
    runtime += [p for layer in FORBIDDEN[1:] for p in sorted((CORE.parent / layer).rglob("*.py"))]
    assert len(runtime) > 60 and (CORE / "testing" / "fake_engine.py").is_file()
    offending = []
    for path in runtime:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(path, node)
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            offending += [
                f"{path.relative_to(CORE.parent)}:{node.lineno}: {name}"
                for name in names
                if name == "cortex.testing" or name.startswith("cortex.testing.")
            ]
    assert offending == [], "\n".join(offending)
