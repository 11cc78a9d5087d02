"""Print kiln's import graph between its units (a subpackage, or a top-level module) and check
it against the layering in LAYERS: imports run one way, from a later layer to an earlier one.

    python scripts/import_graph.py            # edges, cycles, and imports that run back up
    python scripts/import_graph.py --dot      # the same graph in Graphviz dot

Every `from kiln... import` / `import kiln...` counts, at module level or inside a function:
an import deferred into a function is still a dependency, only a later one. Imports under
`if TYPE_CHECKING:` count too (they are read by whoever reads the code). Exit status 1 when
a cycle or an upward import exists, so CI and tests can use it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kiln"

# Lowest first. A unit may import units of earlier layers only; units in one layer are
# independent of each other. "kiln" is the package root (its __init__, the public API), which
# the examples and the CLI use as a user would.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version", "types", "progress", "report"),
    ("budget", "host", "fx_helpers", "timing"),
    ("ir", "options"),
    ("verify",),
    ("hardware_profiles", "frontend", "pruning"),
    ("placement", "precision"),
    ("backends",),
    ("passes",),
    ("artifact",),
    ("runtime",),
    ("build", "cache"),
    ("api", "profile_host"),
    ("sweep",),
    ("kiln",),
    ("examples", "serving"),
    ("cli",),
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    line: int
    deferred: bool  # inside a function body


def unit_of(module: str) -> str:
    """kiln.passes.fuse_attention -> passes; kiln.api -> api; kiln -> kiln."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kiln"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[Import]:
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(source, a.name, child.lineno, deferred) for a in child.names
                             if a.name == "kiln" or a.name.startswith("kiln."))
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child, package)
                if base == "kiln" or base.startswith("kiln."):
                    if base == "kiln":  # from kiln import x: x may be a submodule
                        found.extend(Import(source, f"kiln.{a.name}" if (ROOT / a.name).exists()
                                            or (ROOT / f"{a.name}.py").exists() else "kiln", child.lineno, deferred)
                                     for a in child.names)
                    else:
                        found.append(Import(source, base, child.lineno, deferred))
            visit(child, inner)

    visit(tree, False)
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def all_imports() -> list[Import]:
    return [imp for path in sorted(ROOT.rglob("*.py")) for imp in imports_of(path)]


def unit_edges(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        a, b = unit_of(imp.source), unit_of(imp.target)
        if a != b:
            edges[(a, b)].append(imp)
    return dict(edges)


def layer_of(unit: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if unit in layer), None)


def violations(edges: dict[tuple[str, str], list[Import]]) -> list[str]:
    """Imports that run sideways or back up the layers, and units missing from LAYERS."""
    found = []
    for (a, b), imps in sorted(edges.items()):
        la, lb = layer_of(a), layer_of(b)
        where = ", ".join(f"{i.source}:{i.line}{' (deferred)' if i.deferred else ''}" for i in imps[:3])
        if la is None or lb is None:
            found.append(f"{a} -> {b}: {'a unit' if la is None else 'b unit'} missing from LAYERS ({where})")
        elif lb >= la:
            kind = "sideways (same layer)" if la == lb else "back up"
            found.append(f"{a} -> {b}: {kind} ({where})")
    return found


def cycles(edges) -> list[list[str]]:
    """Strongly connected groups of more than one unit (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot instead of text")
    parser.add_argument("--module-level", action="store_true", help="count only imports run when a module is imported")
    args = parser.parse_args(argv)
    imports = [i for i in all_imports() if not (args.module_level and i.deferred)]
    edges = unit_edges(imports)
    if args.dot:
        print("digraph kiln {\n  rankdir=BT;")
        for (a, b), imps in sorted(edges.items()):
            style = " [style=dashed]" if all(i.deferred for i in imps) else ""
            print(f'  "{a}" -> "{b}"{style};')
        print("}")
        return 0
    print("kiln import graph (unit -> units it imports; * = only inside functions)")
    for layer in reversed(LAYERS):
        for unit in layer:
            targets = sorted({b for (a, b) in edges if a == unit}, key=lambda u: (layer_of(u) or -1, u))
            marked = [f"{b}{'*' if all(i.deferred for i in edges[(unit, b)]) else ''}" for b in targets]
            print(f"  L{layer_of(unit):<2} {unit:<18} -> {', '.join(marked) or '-'}")
    groups = cycles(edges)
    bad = violations(edges)
    print(f"\ncycles between units: {len(groups)}")
    for group in groups:
        print("  " + " <-> ".join(group))
    print(f"imports against the layering: {len(bad)}")
    for line in bad:
        print("  " + line)
    return 1 if groups or bad else 0


if __name__ == "__main__":
    sys.exit(main())
