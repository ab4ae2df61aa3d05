"""The import structure a newcomer can follow: no import cycle (imports inside functions included),
and nothing under ``passes/`` or ``kernels/`` imports the public package (``residual_rewriter/``):
passes and kernels sit below it, and it re-exports what users need from them."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "residual_rewriter"
FOLDERS = {"residual_rewriter": PACKAGE, "passes": f"{PACKAGE}.passes", "kernels": f"{PACKAGE}.kernels"}


def our_modules() -> dict[str, Path]:
    """Importable name -> file, for every module of the three folders (as installed)."""
    modules = {}
    for folder, prefix in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from a import b`: the module a.b when there is one, else a itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> nx.DiGraph:
    modules = our_modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in imports_of(name, path, modules))
    return graph


def test_the_graph_sees_the_imports_it_checks():
    """Guard against a check that cannot fail: known edges are found, relative and inside functions."""
    graph = import_graph()
    assert graph.has_edge(f"{PACKAGE}.driver", f"{PACKAGE}.passes.layerwise")
    assert graph.has_edge(f"{PACKAGE}.passes.layerwise", f"{PACKAGE}.passes.capture")  # relative
    assert graph.has_edge(f"{PACKAGE}.passes.lowering.common", f"{PACKAGE}.kernels.attn_res")
    assert len(graph) > 40


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_passes_and_kernels_do_not_import_the_public_package():
    below = (f"{PACKAGE}.passes", f"{PACKAGE}.kernels")
    upward = [(a, b) for a, b in import_graph().edges
              if a.startswith(below) and not b.startswith(below)]
    assert not upward, "imports from passes/ or kernels/ into residual_rewriter/:\n" + "\n".join(f"{a} -> {b}" for a, b in upward)
