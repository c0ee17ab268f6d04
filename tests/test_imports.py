"""No import cycle anywhere, and every import points down a layer (docs/architecture.md):

    zb front (backend, adapt, dynamo, CLI, API)  ->  runtime  ->  codegen  ->  passes  ->  ops  ->  core
    schedules: pure Python, imports no torch and nothing of zb but itself; every layer may import it

Every product module is read with `ast`, not imported: imports inside functions (lazy ones), under
`if TYPE_CHECKING:` (a type is a dependency of its reader), relative ones, `from zb import adapt` (a module), and
`importlib.import_module` of a module named in the file (zb/__init__.py's lazy attributes) all count. A module's
name comes from pyproject.toml's package-dir mapping (passes/plan.py is zb.passes.plan). Importing `zb.passes.plan`
counts as an edge to that module only, not to the packages above it (Python runs their __init__ first, but a
package importing its own submodules is no cycle).

An edge that breaks a rule today is listed in `_KNOWN`, exactly, with why; an
exemption that no longer matches an edge fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

from tests.product import ROOT, product_modules

# Layer of each package, bottom first: a module may import its own layer and those below it. zb.schedules
# stands apart (see SCHEDULES); every other zb.* module is the front.
LAYERS = {"zb.core": 0, "zb.ops": 1, "zb.passes": 2, "zb.codegen": 3, "zb.runtime": 4, "zb": 5}
SCHEDULES = "zb.schedules"
NO_TORCH = ("torch", "triton", "numpy")  # what zb.schedules may not import, even lazily

# (importer, imported) -> why it is allowed for now; each one is a cycle or upward import to remove.
_KNOWN: dict[tuple[str, str], str] = {}


def _imports(module: str, path: pathlib.Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported name) for every import anywhere in the file; names as written, resolved if relative."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in zb.passes.foo is zb.passes.x
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from zb.passes import batch_rules` imports the module zb.passes.batch_rules; `from zb import
            # ZbError` imports zb itself
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
                      for alias in node.names]
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            dynamic = True
    if dynamic:  # importlib.import_module(name): the product modules the file names as strings are what it loads
        found += [(node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known]
    return found


def _graph() -> tuple[nx.DiGraph, dict[str, list[tuple[int, str]]]]:
    """The product modules and their imports among themselves; and every module's imports (outside ones too)."""
    modules = product_modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    imports = {}
    for module, path in modules.items():
        imports[module] = _imports(module, path, set(modules))
        for line, name in imports[module]:
            if name in modules and name != module:
                where = graph.edges[module, name]["lines"] if graph.has_edge(module, name) else {}
                graph.add_edge(module, name, lines={**where, f"{path.relative_to(ROOT)}:{line}": None})
    return graph, imports


def _layer(module: str) -> str:
    """zb.passes.plan -> 'zb.passes'; zb.backend -> 'zb'; zb.schedules.auto -> 'zb.schedules'."""
    for package in (*LAYERS, SCHEDULES):
        if package != "zb" and (module == package or module.startswith(package + ".")):
            return package
    return "zb"


def _wrong_way(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None."""
    source, target = _layer(importer), _layer(imported)
    if source == SCHEDULES and target != SCHEDULES:
        return "schedules imports nothing of zb but itself"
    if target != SCHEDULES and source != SCHEDULES and LAYERS[target] > LAYERS[source]:
        return f"{source} is below {target}"
    return None


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """The reader itself, on a module zb.passes.example: every way of importing a product module is an edge."""
    path = tmp_path / "example.py"
    path.write_text(
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "import zb.core.options as options\n"
        "from . import plan\n"
        "from .verify import verify\n"
        "from zb import adapt, ZbError\n"
        "if TYPE_CHECKING:\n"
        "    from zb.runtime import PipelineRunner\n"
        "def lazy():\n"
        "    from zb.codegen.program import Program\n"
        "    return importlib.import_module('zb.backend')\n")
    found = {name for _, name in _imports("zb.passes.example", path, set(product_modules()))}
    assert {"zb.core.options", "zb.passes.plan", "zb.passes.verify", "zb.adapt", "zb", "zb.runtime",
            "zb.codegen.program", "zb.backend"} <= found, found
    graph, _ = _graph()
    assert graph.has_edge("zb.cli", "zb.check")  # lazily, inside a function
    assert graph.has_edge("zb", "zb.backend")  # zb/__init__.py's lazy attributes


def test_no_import_cycle():
    graph, _ = _graph()
    stale = set(_KNOWN) - set(graph.edges)
    assert not stale, f"exemptions that no longer match an import (remove them from _KNOWN): {stale}"
    graph.remove_edges_from(_KNOWN)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        lines = "\n".join(f"  {a} -> {b}  ({', '.join(graph.edges[a, b]['lines'])})" for a, b in cycle)
        raise AssertionError(f"import cycle:\n{lines}")


def test_every_import_points_down_a_layer():
    graph, _ = _graph()
    wrong = [f"  {a} -> {b}: {why}  ({', '.join(graph.edges[a, b]['lines'])})" for a, b in graph.edges
             if (a, b) not in _KNOWN and (why := _wrong_way(a, b)) is not None]
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


def test_schedules_imports_no_torch_even_lazily():
    _, imports = _graph()
    wrong = [f"  {module}:{line} imports {name}" for module, found in imports.items() if _layer(module) == SCHEDULES
             for line, name in found if name.split(".")[0] in NO_TORCH]
    assert not wrong, "zb.schedules is pure Python:\n" + "\n".join(wrong)
