"""House rules, checked by reading every product module with `ast` (nothing is imported).

PyTorch's private APIs are touched in one module only, core/torch_internals.py (zb.core.torch_internals); its
docstring lists each internal, why zb needs it and the torch version it was checked on. Everywhere else these are
errors, reported as file:line:
  * a dotted path from torch with a private component (one leading underscore): `torch._dynamo.reset`,
    `torch.utils._pytree`, `torch.Tensor._make_subclass`, `F._x` after `import torch.nn.functional as F`, and the
    same written as an import (`import torch._inductor.config`, `from torch._guards import ...`,
    `from torch import _dynamo`); `torch.fx.experimental` counts as private too;
  * such a path as a whole string (`importlib.import_module("torch._dynamo")`, `mock.patch("torch.utils._x.f")`),
    or a private name read with getattr from a torch object (`getattr(torch, "_C")`);
  * a private keyword argument of a torch callable (`DeviceMesh(..., _rank=0)`);
  * a private attribute of a torch object reached through a value, which no import shows: the names in
    `_PRIVATE_ATTRIBUTES` (`op._schema`, `tensor._base`, `module._parameters`, ...), on anything but self/cls.
Operators are not internals (the rule is in torch_internals' docstring): `torch._foreach_*`, `torch._fused_*` (the
ATen operators torch.optim itself calls) and `torch._grouped_mm`, and anything reached through `torch.ops`
(`torch.ops.aten._to_copy`), may be called anywhere.

No product module uses unittest.mock (or the `mock` package): patching is for tests.

Files with violations that belong to someone else's change are listed in `_NOT_YET`, each exactly; an entry whose
file no longer violates fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

from tests.product import ROOT, product_modules

INTERNALS = "core/torch_internals.py"

# Product files (relative to the repository root) that still touch private torch APIs, for their owners to route
# through zb.core.torch_internals.
_NOT_YET: set[str] = set()

# Operators called as torch.<name>: ATen operator functions, not internals.
_OPERATORS = re.compile(r"_foreach_\w+|_fused_\w+|_grouped_mm")

# Private attributes of torch objects (operator overloads, tensors, modules, graphs, autocast regions, process
# groups) that a value carries: the import-based rules cannot see them, so they are named here.
_PRIVATE_ATTRIBUTES = {"_schema", "_overloadname", "_op_dispatcher", "_codegen", "_base", "_is_view", "_use_count",
                       "_make_subclass", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                       "_enabled", "_get_default_store"}

_PATH = re.compile(r"torch(\.\w+)+")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_path(path: str) -> bool:
    """A dotted torch path with a private part (operators aside), or under torch.fx.experimental."""
    parts = path.split(".")
    if parts[0] != "torch" or parts[1:2] == ["ops"]:
        return False
    if ".".join(parts[:3]) == "torch.fx.experimental":
        return True
    for i, part in enumerate(parts[1:], 1):
        if _private(part):
            return not (i == 1 and _OPERATORS.fullmatch(part))
    return False


def _files() -> dict[str, pathlib.Path]:
    """Every .py of every product package, by its path relative to the repository root."""
    return {str(path.relative_to(ROOT)): path for path in product_modules().values()}


def _bound(tree: ast.AST) -> dict[str, str]:
    """Local name -> the torch path it stands for, from every import in the file (module level or not)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    names[alias.asname or "torch"] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _path(node: ast.AST, bound: dict[str, str]) -> str | None:
    """The torch path an attribute chain (`torch.a.b`, `F.x`) spells, or None when it does not start at torch."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bound:
        return None
    return ".".join([bound[node.id], *reversed(parts)])


def violations(source: str) -> list[tuple[int, str]]:
    """(line, what) for every private torch use and every mock in one module's source."""
    tree = ast.parse(source)
    bound = _bound(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def whole(node: ast.AST) -> str | None:  # the longest chain through `node`: torch._C._set_grad_enabled
        while isinstance(parents.get(node), ast.Attribute) and parents[node].value is node:
            node = parents[node]
        return _path(node, bound)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _private_path(alias.name):
                    found.append((node.lineno, f"imports {alias.name}"))
                if alias.name in ("unittest.mock", "mock") or alias.name.startswith(("unittest.mock.", "mock.")):
                    found.append((node.lineno, f"imports {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            for alias in node.names:
                if module.split(".")[0] == "torch" and _private_path(f"{module}.{alias.name}"):
                    found.append((node.lineno, f"imports {alias.name} from {module}"))
                if module in ("unittest.mock", "mock") or (module == "unittest" and alias.name == "mock"):
                    found.append((node.lineno, f"imports {alias.name} from {module}"))
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            path = _path(node, bound)
            inner = _path(node.value, bound)
            if path is not None and _private_path(path) and not (inner and _private_path(inner)):
                found.append((node.lineno, f"uses {whole(node)}"))  # (reported at its first private part only)
            elif path is None and node.attr in _PRIVATE_ATTRIBUTES and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, f"reads the private attribute .{node.attr} of a torch object"))
        elif isinstance(node, ast.Attribute) and node.attr == "experimental":
            path = _path(node, bound)
            if path is not None and _private_path(path):
                found.append((node.lineno, f"uses {whole(node)}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _PATH.fullmatch(node.value) \
                and _private_path(node.value):
            found.append((node.lineno, f"names {node.value} in a string"))
        elif isinstance(node, ast.Call):
            callee = _path(node.func, bound)
            if callee is not None:
                found += [(node.lineno, f"passes the private argument {k.arg}= to {callee}")
                          for k in node.keywords if k.arg and _private(k.arg)]
            if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and len(node.args) > 1:
                owner, name = _path(node.args[0], bound), node.args[1]
                if owner is not None and isinstance(name, ast.Constant) and isinstance(name.value, str) \
                        and _private_path(f"{owner}.{name.value}"):
                    found.append((node.lineno, f"reads {owner}.{name.value} with {node.func.id}"))
    return sorted(set(found))


def _all_violations() -> dict[str, list[tuple[int, str]]]:
    return {name: found for name, path in _files().items() if name != INTERNALS
            and (found := violations(path.read_text()))}


def test_the_reader_sees_every_kind_of_private_use():
    source = '''
import importlib
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import _dynamo, fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.distributed.device_mesh import DeviceMesh
from unittest import mock
torch._C._set_grad_enabled
torch.Tensor._make_subclass
F._private_helper
fx.experimental.proxy_tensor
importlib.import_module("torch.utils._pytree")
getattr(torch, "_C")
DeviceMesh("cpu", [0, 1], _rank=0)
node.target._schema
self._schema
torch._foreach_add_([a], [b])
torch._fused_adam_
torch._grouped_mm
torch.ops.aten._to_copy.default
torch.utils.checkpoint.checkpoint
"error text naming torch._dynamo.config.x inside a sentence"
'''
    lines = [line for line, _ in violations(source)]
    assert lines == [4, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18], violations(source)


def test_only_torch_internals_touches_private_torch_apis():
    found = _all_violations()
    stale = sorted(_NOT_YET - set(found))
    assert not stale, f"files in _NOT_YET that no longer touch private torch APIs (remove them): {stale}"
    wrong = [f"  {name}:{line}: {what}" for name, items in sorted(found.items()) if name not in _NOT_YET
             for line, what in items]
    assert not wrong, ("private torch APIs outside zb.core.torch_internals (route them through it, and list "
                       "each there with why zb needs it):\n" + "\n".join(wrong))


def test_torch_internals_loads_no_compiler_at_import():
    """zb.core.torch_internals is imported by light modules: Dynamo, AOTAutograd and Inductor load on first use."""
    code = ("import sys, zb.core.torch_internals; print(sorted({m.split('.')[1] for m in sys.modules "
            "if m.startswith(('torch._dynamo', 'torch._inductor', 'torch._functorch.aot_autograd'))}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout


# ---- value keys are typed (passes/keys.py), never spelled or parsed as text -------------------------------------

KEYS = "passes/keys.py"
_KEY_TEXT = re.compile(r"(in|out|act|saved|stash|grad|tangent|denominator):")


def key_text_uses(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string literal, or literal head of an f-string, spelled like a value key ("in:",
    f"grad:{key}", `.startswith("act:")`): keys are made by passes/keys.py and read by their fields. Docstrings
    are prose and may show keys."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and _KEY_TEXT.match(node.value):
            found.append((node.lineno, repr(node.value)))
    return sorted(found)


def test_the_key_reader_sees_spelled_keys():
    source = '''
"""A docstring naming in:<i> and grad:in:<i>."""
key.startswith("grad:in:")
f"tangent:{key}"
k.removeprefix("act:")
keys = ("saved:", "stash:")
"denominator:" + str(i)
message = f"input: {x}, output {y}"
"inside: not a key"
'''
    assert [line for line, _ in key_text_uses(source)] == [3, 4, 5, 6, 6, 7], key_text_uses(source)


def test_no_product_module_spells_or_parses_a_key():
    wrong = [f"  {name}:{line}: {text}" for name, path in _files().items() if name != KEYS
             for line, text in key_text_uses(path.read_text())]
    assert not wrong, ("value keys spelled as text (make them with zb.passes.keys and read their fields):\n"
                       + "\n".join(wrong))


# ---- small files, classes that say their job --------------------------------------------------------------------

def test_no_product_file_is_over_500_lines():
    long = {name: n for name, path in _files().items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, f"product files over 500 lines (split them along their jobs): {long}"


def test_every_product_class_says_its_job():
    silent = [f"{name}:{node.lineno} {node.name}" for name, path in _files().items()
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.ClassDef) and not ast.get_docstring(node)]
    assert not silent, "classes without a docstring saying their job:\n" + "\n".join(silent)
