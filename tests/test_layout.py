"""The shape of the code: service/'s packages depend downward only, with no import cycle,
empty `__init__` files, and no long function without a reason in its docstring."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"

# Bottom to top: a module may import from its own layer or any layer listed before it.
LAYERS = [
    ("service.config", "service.clock", "service.errors"),
    ("service.logs", "service.metrics"),
    ("service.storage",),
    ("service.copernica",),
    ("service.requests",),
    ("service.intake",),
    ("service.answer",),
    ("service.collect",),
    ("service.web",),
    ("service.simulator",),
    ("service.app",),
    ("service.cli", "service.__main__"),
]
MAX_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def imports(path: Path) -> set[str]:
    """Every `service.*` module the file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("service")}
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SERVICE.rglob("*.py")}


def test_every_import_points_down_or_sideways() -> None:
    upward = [
        f"{name} imports {target}"
        for name, path in modules().items()
        for target in imports(path)
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        graph[name] = {t for t in imports(path) if t in known and t != name}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_init_files_are_empty_but_for_a_docstring() -> None:
    for path in SERVICE.rglob("__init__.py"):
        body = ast.parse(path.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), (
            path
        )


def test_no_function_is_long_without_saying_why() -> None:
    """A function over ~60 lines says in its docstring why it stays one function."""
    long = []
    for path in SERVICE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if lines > MAX_LINES and "one function" not in doc:
                    long.append(f"{path.relative_to(SERVICE)}:{node.name} ({lines} lines)")
    assert long == []


def test_a_records_facts_are_types_not_dicts() -> None:
    """The request record's facts are frozen dataclasses: no `dict[str, Any]` field."""
    source = (SERVICE / "requests" / "records.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    assert "dict[" not in ast.unparse(item.annotation), (node.name, item)
