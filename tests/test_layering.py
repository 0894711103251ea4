"""The package's layers import one way (DESIGN.md): cli → orchestrator → trainables / search_spaces / cluster
→ spec → vocab, with no import circles, counting the imports inside functions too (only `TYPE_CHECKING`
blocks are left out: they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peftsweep"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.module.startswith("peftsweep"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("peftsweep"))

    Visitor().visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    raw = {_module(p): _imports(ast.parse(p.read_text())) for p in PACKAGE.rglob("*.py")}
    return {m: {d for d in deps if d in raw and d != m} for m, deps in raw.items()}


GRAPH = _graph()


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "peftsweep"


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert circles == []


# What each layer may import of the package (besides itself and the package root).
ALLOWED = {
    "vocab": set(),
    "spec": {"vocab", "search_spaces"},
    "search_spaces": {"vocab"},
    "cluster": {"spec", "vocab"},
    "trainables": {"spec", "vocab", "search_spaces"},
    "orchestrator": {"spec", "vocab", "search_spaces", "trainables", "cluster"},
}


def test_every_layer_imports_only_the_layers_below_it() -> None:
    wrong = [
        f"{module} imports {dep}"
        for module, deps in GRAPH.items()
        if (layer := _layer(module)) in ALLOWED
        for dep in deps
        if _layer(dep) not in ALLOWED[layer] | {layer, "peftsweep"}
    ]
    assert wrong == []


def test_spec_imports_nothing_of_the_training_code() -> None:
    assert not {d for d in GRAPH["peftsweep.spec"] if _layer(d) in ("trainables", "orchestrator")}
