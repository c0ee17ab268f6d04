"""The vocabulary normalize_loss reads a loss in: the reductions and arithmetic it understands, the terms and
the `LossSpec` it hands the runtime, and the small questions it asks of one FX node (torch-level graphs)."""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from zb.core import torch_internals

# F.*_loss functions whose `reduction` says how they normalise: (mean of elements) or (sum).
ELEMENTWISE_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                      F.binary_cross_entropy_with_logits, F.kl_div, F.soft_margin_loss, F.poisson_nll_loss,
                      F.gaussian_nll_loss, F.cross_entropy, F.nll_loss)
ADD = (operator.add, torch.add, operator.sub, torch.sub)
MUL = (operator.mul, torch.mul)
DIV = (operator.truediv, torch.div, torch.true_divide)
NEG = (operator.neg, torch.neg)
MEAN, SUM, RATIO = "mean", "sum", "ratio"


@dataclass(frozen=True)
class LossTerm:
    """One additive term of the loss and how the microbatches' values of it combine into eager's (MEAN, SUM, RATIO)."""
    node: str  # the term's node in plan.graph (for a constant: the addition that adds it)
    parent: str  # the node of the loss expression that reads it ("output" for the loss itself)
    kind: str  # MEAN, SUM or RATIO
    denominator: int = -1  # RATIO: index into the denominator graph's outputs
    constant: bool = False  # a number added to the loss (node is the addition)


@dataclass
class LossSpec:
    """How the runtime turns per-microbatch losses into the step's (see the module docstring)."""

    mode: str  # "mean": seed 1/m, average; "sum": seed 1, add; "weighted": weights as inputs, seed 1, add
    # "weighted": (plan input index of the weight, its kind, the denominator index for RATIO) per weighting class:
    # a MEAN weight is 1/m, a SUM weight 1, a RATIO weight 1 / (that denominator summed over the microbatches)
    weights: list[tuple[int, str, int]] = field(default_factory=list)
    terms: list[LossTerm] = field(default_factory=list)
    # For each model output: how its microbatches combine: "loss", MEAN, SUM, (RATIO, index), ("concat", dim),
    # "first".
    outputs: list[Any] = field(default_factory=list)
    denominator: fx.GraphModule | None = None  # one microbatch's inputs (in:<i>) -> every RATIO denominator
    learned: list[bool] = field(default_factory=list)  # per output: depends on a parameter (eager's requires_grad)

    def describe(self) -> str:
        if self.mode != "weighted":
            return f"loss: {self.mode} over microbatches"
        kinds = ", ".join(f"{t.node} ({t.kind})" for t in self.terms)
        return f"loss: weighted per microbatch to equal the whole batch's: {kinds}"


def reduced_arg(node: fx.Node) -> Any:
    """What a reduction (a leaf of the loss) reduces: its first argument."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase `nodes` once nothing reads them, and then what only they read. Not fx's eliminate_dead_code: on a
    torch-level graph it counts every call_method as pure, so it would erase `mask.scatter_(...)`,
    `out.add_(bias)` or `x[i] = v`, whose results nobody reads but whose effects the model needs."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node.graph is not graph or node.users or node.op not in ("call_function", "call_method") \
                or mutates(node) or node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        todo.extend(inputs)


def mutates(node: fx.Node) -> bool:
    """An in-place call at torch level: a Tensor method or function ending in '_', or an item assignment."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    schema = torch_internals.op_schema(target)
    return name.endswith("_") and not name.endswith("__") or target is operator.setitem or (
        schema is not None and schema.is_mutable)


def baked_numbers(node: fx.Node) -> list[Any]:
    """The node's arguments that are not other nodes (the numbers a trace baked in)."""
    found: list[Any] = []
    fx.node.map_aggregate([*node.args, *node.kwargs.values()],
                          lambda x: None if isinstance(x, fx.Node) else found.append(x))
    return found


def is_scalar(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.dim() == 0


def describe(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def uncast(node: fx.Node) -> fx.Node:
    """The value under dtype conversions (`count.float()`, `.to(torch.float32)`), which do not change a sum."""
    while node.op == "call_method" and node.target in ("float", "double", "half", "bfloat16", "to", "type_as") \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def bind_arguments(node: fx.Node) -> dict[str, Any]:
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return {}
    return dict(bound.arguments)


def index_targets(target: Any) -> bool:
    value = target.meta.get("example_value") if isinstance(target, fx.Node) else None
    return isinstance(value, torch.Tensor) and not value.is_floating_point()
