"""The import structure a newcomer can follow: no import cycle (imports inside functions included),
and nothing under ``passes/`` or ``kernels/`` imports the public package (``residual_rewriter/``):
passes and kernels sit below it, and it re-exports what users need from them."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

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


# ---------------------------------------------------------------------------------------------------
# The reading path of ``convert_`` (issue 18: at most 12 modules and 2,500 lines)
# ---------------------------------------------------------------------------------------------------
# Not the conversion: the compile backend's passes, the kernels, the model being converted.
NOT_CONVERSION = (f"{PACKAGE}.passes.lowering", f"{PACKAGE}.kernels", f"{PACKAGE}.models")


def reading_path() -> dict[str, int]:
    """Module -> lines (``wc -l``) of every module of ``residual_rewriter/`` and ``passes/`` in which
    some function runs while ``convert_`` converts a tiny Hugging Face Llama and the built-in GPT.
    Measured with ``sys.setprofile`` (what runs, not what is imported); a function's module is its
    frame's globals, so dataclass-generated methods count for the module that defines the class."""
    import sys

    import residual_rewriter as rr
    from model_zoo import make_architecture, make_gpt

    models = [make_architecture("llama"), make_gpt()]
    ran: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            ran.add(frame.f_globals.get("__name__", ""))

    for model in models:
        sys.setprofile(profile)
        try:
            rr.convert_(model)
        finally:
            sys.setprofile(None)
    ours = sorted(m for m in ran if (m == PACKAGE or m.startswith(PACKAGE + ".")) and not m.startswith(NOT_CONVERSION))
    return {m: len(Path(sys.modules[m].__file__).read_text().splitlines()) for m in ours}


@pytest.fixture(scope="module")
def path() -> dict[str, int]:
    measured = reading_path()
    assert f"{PACKAGE}.driver" in measured and f"{PACKAGE}.passes.rewrite" in measured  # the measure sees the path
    return measured


def _table(path: dict[str, int]) -> str:
    return f"{len(path)} modules, {sum(path.values())} lines:\n" + "\n".join(f"{n:5d} {m}" for m, n in path.items())


def test_convert_reads_in_at_most_12_modules(path):
    assert len(path) <= 12, _table(path)


# Decision (session 11, NOTES.md): the constructs issue 20 asked for (streams starting inside a layer, casts
# on the skip, children traced in, resized streams, ...) stay, and they are most of the way from 2,500 to
# today's count. The target stays visible as a strict xfail; the ratchet below makes growth pay for itself.
READING_PATH_LINES = 3784


@pytest.mark.xfail(strict=True, reason=f"issue 18: {READING_PATH_LINES:,} lines today")
def test_convert_reads_in_at_most_2500_lines(path):
    assert sum(path.values()) <= 2500, _table(path)


def test_the_reading_path_does_not_grow(path):
    """A change that adds lines to convert_'s path removes as many elsewhere on it, or raises
    READING_PATH_LINES and says why in its commit message."""
    assert sum(path.values()) <= READING_PATH_LINES, _table(path)


if __name__ == "__main__":  # python tests/test_import_structure.py: the reading path, module by module
    import sys

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's package, whatever is installed
    measured = reading_path()
    for module, n in measured.items():
        print(f"{n:5d}  {Path(sys.modules[module].__file__).relative_to(ROOT)}")
    print(f"{sum(measured.values()):5d}  total, {len(measured)} modules")
