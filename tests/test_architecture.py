"""The package's import graph, read from the source (ast, nothing imported): no module imports itself back
through others, and the model layer never reads the recipe schema.

Every import counts, at module level or inside a function (a lazy import still ties two modules), except those
under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "finetune"
# the recipe's schema: the reader, its sections, the data section and the method sections
RECIPE_SCHEMA = ("finetune.recipe", "finetune.sections", "finetune.data.config", "finetune.methods")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imported(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The package's modules that `path` imports (`from a import b` names a.b when b is a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, package.parent): p for p in package.rglob("*.py")}
    return {name: imported(path, set(files), package.parent) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each as one loop through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(_loop(graph, set(group)))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def _loop(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One import path that leaves the group's first module and comes back to it (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return sorted(group)


def test_the_package_has_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(loop) for loop in found)


def test_the_model_layer_never_imports_the_recipe_schema():
    graph = import_graph()
    bad = sorted((m, t) for m in graph if m.startswith("finetune.models") for t in graph[m]
                 if t.startswith(RECIPE_SCHEMA))
    assert not bad, f"finetune/models imports the recipe schema: {bad}"


def test_the_scan_sees_circles_and_lazy_imports(tmp_path):
    """The scan itself: a circle through a function-level import is found, one under TYPE_CHECKING is not."""
    pkg = tmp_path / "finetune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from finetune import b\n")
    (pkg / "b.py").write_text("def f():\n    from finetune.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from finetune import a\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(pkg)
    assert graph["finetune.c"] == set() and graph["finetune.d"] == {"finetune.c"}
    assert cycles(graph) == [["finetune.a", "finetune.b", "finetune.a"]]
