"""The package's shape, checked on its AST: size limits and the layer table of ARCHITECTURE.md.

The limits are the house rules (no class over 30 methods but the pyfuse3 Operations subclass, no
function over 60 statements, no module over 600 lines); the layer table is the map, and a map
that disagrees with the imports is worse than none.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "volfs"
ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"

MAX_METHODS = 30
MAX_STATEMENTS = 60
MAX_LINES = 600
# One method per FUSE handler: the Operations subclass is allowed its handlers plus a few helpers.
OPERATIONS_CLASSES = {"VolumeOperations"}
OPERATIONS_HELPERS = 12


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__"):
            continue
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _statements(node: ast.AST) -> int:
    """Statements inside a function, nested functions' included (they are part of its body)."""
    return sum(isinstance(n, ast.stmt) for n in ast.walk(node)) - 1


def _handler_names() -> set[str]:
    import pyfuse3

    return {n for n, v in vars(pyfuse3.Operations).items() if callable(v) and not n.startswith("_")}


def test_size_limits() -> None:
    handlers = _handler_names()
    over = []
    for name, path in MODULES.items():
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_LINES:
            over.append(f"{name}: {lines} lines (limit {MAX_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                methods = [
                    m.name
                    for m in node.body
                    if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                ]
                if node.name in OPERATIONS_CLASSES:
                    helpers = [m for m in methods if m not in handlers and m != "__init__"]
                    if len(helpers) > OPERATIONS_HELPERS:
                        over.append(
                            f"{name}.{node.name}: {len(helpers)} helpers beside the "
                            f"FUSE handlers (limit {OPERATIONS_HELPERS})"
                        )
                elif len(methods) > MAX_METHODS:
                    over.append(f"{name}.{node.name}: {len(methods)} methods (limit {MAX_METHODS})")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = _statements(node)
                if count > MAX_STATEMENTS:
                    over.append(f"{name}.{node.name}: {count} statements (limit {MAX_STATEMENTS})")
    assert not over, "split these:\n" + "\n".join(over)


def _layer_table() -> list[set[str]]:
    """The modules of each row of ARCHITECTURE's layer table, top (highest) first."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        files = re.findall(r"`(volfs/[\w/]+)\.py`", cells[1]) if len(cells) > 1 else []
        if files:
            rows.append({f.replace("/", ".") for f in files})
    return rows


def _imports(name: str, path: Path) -> set[str]:
    package = name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    # Imports only for type checking (a part naming the class that owns it) are not a
    # dependency at run time; ARCHITECTURE says where they are allowed.
    typing_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for child in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES)
    found.discard(name)
    return found


def test_layer_table_lists_every_module_once() -> None:
    rows = _layer_table()
    listed = [m for row in rows for m in row]
    assert sorted(set(listed)) == sorted(listed), "a module is in the layer table twice"
    assert set(listed) == set(MODULES), (
        f"not in the layer table: {sorted(set(MODULES) - set(listed))}; "
        f"in the table but not in the package: {sorted(set(listed) - set(MODULES))}"
    )


def test_layers_depend_only_downward() -> None:
    rows = _layer_table()
    rank = {m: i for i, row in enumerate(rows) for m in row}
    upward = []
    for name, path in MODULES.items():
        for target in sorted(_imports(name, path)):
            if name in rank and target in rank and rank[target] < rank[name]:
                upward.append(
                    f"{name} (row {rank[name] + 1}) imports {target} (row {rank[target] + 1})"
                )
    assert not upward, "ARCHITECTURE's layer table says these go upward:\n" + "\n".join(upward)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_has_a_docstring(name: str) -> None:
    assert ast.get_docstring(ast.parse(MODULES[name].read_text())), f"{name} has no docstring"
