"""headlab's import graph, rebuilt from the source with pyproject's package-dir mapping (lazy imports counted).

``python tests/import_graph.py`` prints the cycles and the edges that run up a floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

# Floors, lowest first: an import may run down or sideways within a floor, never up.
FLOORS = [
    {"headlab"},
    {"headlab.kernels"},
    {"headlab.probes", "headlab.interventions"},
    {"headlab.analyses"},
    {"headlab.dashboard", "headlab.cli"},
]


def package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {package: ROOT / folder for package, folder in config.items()}


def modules() -> dict[str, Path]:
    """Every product module: ``headlab.x.y`` -> file."""
    found: dict[str, Path] = {}
    for package, folder in sorted(package_dirs().items(), key=lambda kv: -len(kv[0])):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            name = name.removesuffix(".__init__")
            found.setdefault(name, path)
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def edges() -> dict[str, set[str]]:
    """module -> the product modules it imports, anywhere in the file (function bodies included)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in known:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def floor(module: str) -> int:
    """The floor of the longest package that holds ``module``."""
    matches = [(len(package), level) for level, packages in enumerate(FLOORS) for package in packages
               if module == package or module.startswith(package + ".")]
    return max(matches)[1]


def up_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    g = edges()
    for c in cycles(g):
        print("cycle:", " ".join(c))
    for a, b in up_edges(g):
        print(f"up: {a} -> {b}")
