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
    offending = [f"{path.relative_to(CORE.parent)}:{line}: import {name}"
                 for path in files for line, name in _imports(path)
                 if name.split(".")[0] in FORBIDDEN]
    assert offending == [], "\n".join(offending)
