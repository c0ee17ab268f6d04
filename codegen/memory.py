"""The bytes one piece allocates while it runs, and which of its outputs are new tensors: read from its graph.

A piece runs its nodes in order and frees each value after its last reader (as an `fx.GraphModule`'s generated
code does, and as the runtime runs a piece for compiler="eager"). Walking the graph that way, with each node's
example value (`meta["val"]`), gives:

  * `peak`: the most bytes the piece holds at once beyond its inputs (intermediates and the outputs made so far);
  * per output, the storage it lives in: one of the piece's inputs (a view of it, or the input itself: no new
    bytes) or a new allocation, several outputs sharing one when one is a view of another.

A view (an operator whose schema says its result aliases an argument, `getitem` of a tuple, an in-place op) owns
no bytes: it keeps its base alive. Inductor fuses and reuses buffers, so for compiled pieces `peak` is an upper
bound; for compiler="eager" it is what runs, less the scratch space inside single operators.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from zb.core import torch_internals
from zb.passes.plan import nbytes, output_values


@dataclass(frozen=True)
class PieceMemory:
    """`peak`: bytes held at most while the piece runs, beyond its inputs. `outputs`, one per output: ("input", i)
    (it is input i's storage), ("new", j, bytes) (allocation j of the piece; outputs sharing j share bytes) or
    ("none",) (not a tensor)."""

    peak: int
    outputs: tuple[tuple, ...]


def piece_memory(gm: fx.GraphModule, sizes: dict | None = None) -> PieceMemory:
    """The piece's memory; symbolic sizes counted at `sizes` (None: as traced; see passes/plan.py `concrete`)."""
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    placeholders = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    root: dict[fx.Node, fx.Node] = {}  # node -> the node whose allocation holds its value
    made_at: dict[fx.Node, int] = {}  # allocation -> the position of the operation that makes it
    for node in nodes:
        source = _alias_source(node)
        if source is None:
            root[node] = node
        elif node.target is operator.getitem and root[source] is source and source.op != "placeholder":
            root[node] = node  # one output of an operation with several: an allocation of its own, made by it
            made_at[node] = position[source]
        else:
            root[node] = root[source]
    end = len(nodes)
    death: dict[fx.Node, int] = {}  # allocation -> the position after which nothing reads it
    for node in nodes:
        last = max((position[u] for u in node.users), default=position[node])
        if any(u.op == "output" for u in node.users):
            last = end
        r = root[node]
        death[r] = max(death.get(r, 0), last)
    allocated: dict[int, int] = {}
    frees: dict[int, int] = {}
    for node in nodes:
        if root[node] is not node or node.op in ("placeholder", "output", "get_attr"):
            continue
        value = node.meta.get("val")
        if isinstance(value, (tuple, list)) and any(u.target is operator.getitem for u in node.users):
            continue  # its outputs are counted where they are read (an output nobody reads may not exist at all)
        size = nbytes(value, sizes)
        at = made_at.get(node, position[node])
        allocated[at] = allocated.get(at, 0) + size
        frees[death[node]] = frees.get(death[node], 0) + size
    live = peak = 0
    for i in range(len(nodes)):
        live += allocated.get(i, 0)
        peak = max(peak, live)
        live -= frees.get(i, 0)
    allocations: dict[fx.Node, int] = {}
    outputs = []
    for value in output_values(gm):
        if not isinstance(value, fx.Node) or not isinstance(value.meta.get("val"), torch.Tensor):
            outputs.append(("none",))
            continue
        r = root[value]
        if r in placeholders:
            outputs.append(("input", placeholders[r]))
        else:
            outputs.append(("new", allocations.setdefault(r, len(allocations)), nbytes(r.meta.get("val"), sizes)))
    return PieceMemory(peak, tuple(outputs))


def _alias_source(node: fx.Node) -> fx.Node | None:
    """The node whose storage `node`'s value lives in when it is a view (or an in-place result), else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = node.target
    if target is operator.getitem:
        return node.args[0]
    schema = torch_internals.op_schema(target)
    if schema is not None:
        returns = schema.returns
        if returns and returns[0].alias_info is not None:
            return node.args[0]
    return None
