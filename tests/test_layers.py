"""The layers import only downwards (docs/architecture.md): read every module's imports and check them.

    core  <-  ops  <-  passes  <-  codegen  <-  runtime  <-  zb front (backend, adapt, dynamo, CLI, API)
    schedules: imports no torch and no other zb layer; every layer may import it

Imports inside functions count too (a lazy import is still a dependency), and so do imports under
`if TYPE_CHECKING:` (a type is a dependency of the reader).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layer of each top-level folder, bottom first; a module may import its own layer and those below it.
LAYERS = {"core": 0, "ops": 1, "passes": 2, "codegen": 3, "runtime": 4, "zb": 5}
FOLDER = {"core": "core", "ops": "ops", "passes": "passes", "codegen": "codegen", "runtime": "runtime",
          "schedules": "schedules", "zb": "zb"}


def _layer_of(module: str) -> str | None:
    """zb.passes.plan -> 'passes'; zb.backend -> 'zb'; torch -> None."""
    parts = module.split(".")
    if parts[0] != "zb":
        return None
    if len(parts) > 1 and parts[1] in FOLDER and parts[1] != "zb":
        return parts[1]
    return "zb"


def _imports(path: pathlib.Path, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "zb":  # `from zb import adapt` names a module of the front
                found += [(node.lineno, f"zb.{alias.name}") for alias in node.names
                          if (ROOT / "zb" / f"{alias.name}.py").exists()]
    return found


def _modules():
    for folder in FOLDER.values():
        for path in sorted((ROOT / folder).glob("*.py")):
            package = "zb" if folder == "zb" else f"zb.{folder}"
            yield folder, path, package


def test_every_layer_imports_only_downwards():
    wrong = []
    for folder, path, package in _modules():
        for line, module in _imports(path, package):
            target = _layer_of(module)
            if target is None:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if folder == "schedules":
                if target != "schedules":
                    wrong.append(f"{where} (schedules stands apart)")
            elif target != "schedules" and LAYERS[target] > LAYERS[folder]:
                wrong.append(f"{where} ({folder} is below {target})")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


def test_schedules_and_core_import_no_torch_at_module_level():
    wrong = []
    for folder, path, _ in _modules():
        if folder not in ("schedules", "core") or path.name == "torch_internals.py":
            continue  # (core/torch_internals.py is the door to torch's internals: the layers that use torch load it)
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: core imports torch lazily to check option values
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in ("torch", "triton", "numpy")]
    assert not wrong, "\n".join(wrong)


def test_the_runtime_reads_no_fx_graph():
    """The runtime gets an executable program from codegen: it never walks an FX graph."""
    wrong = []
    for path in sorted((ROOT / "runtime").glob("*.py")):
        text = path.read_text()
        for needle in ("torch.fx", "from torch import fx", ".graph.nodes", "find_nodes", "output_keys",
                       "zb.passes"):
            if needle in text:
                wrong.append(f"{path.relative_to(ROOT)} uses {needle}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("statement", ["import zb.schedules", "import zb", "import zb.cli",
                                       "from zb.core.options import Options"])
def test_the_front_package_and_schedules_load_without_torch(statement):
    code = f"import sys; {statement}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_core_errors_options_and_schedules_load_without_torch():
    code = ("import sys, zb.core.errors, zb.core.options, zb.schedules; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
