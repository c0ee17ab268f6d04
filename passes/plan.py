"""The program zb compiles, as plain data: what every pass reads and writes.

A `Plan` holds the Dynamo graph, a description of its inputs, and one `Stage` per pipeline stage. A stage
owns its pieces: `forward` (F), `backward_input` (B) and `backward_weight` (W), each an `fx.GraphModule`.

Pieces talk to each other only through *value keys* (`zb.passes.keys.Key`), typed values that name a tensor of
one microbatch and print as `in:<i>`, `act:<name>`, `out:<j>`, `tangent:<key>`, `saved:<name>`, `stash:<name>`,
`grad:<key>` (see passes/keys.py).

Every placeholder of a piece carries its key in `node.meta["zb_key"]`, and `gm.meta["zb_output_keys"]` lists the
key of each output (None for an output nobody reads). So a piece describes its own calling convention, the
runtime is a loop over `env[key]`, and the dumps show how data flows between pieces.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from zb.core import torch_internals
from zb.core.options import Options
from zb.passes.keys import Key, Kind, PieceName, Role, input_key

PIECES = (PieceName.FORWARD, PieceName.BACKWARD_INPUT, PieceName.BACKWARD_WEIGHT)

InputKind = Literal["parameter", "buffer", "input", "constant", "loss_weight"]


@dataclass(frozen=True)
class InputSpec:
    """One input of the Dynamo graph."""

    index: int
    kind: InputKind
    name: str  # "blocks.0.attn.qkv.weight" for a parameter, "x" for a user input
    requires_grad: bool
    batched: bool  # split along dim 0 into microbatches
    source: str = ""  # Dynamo's source, e.g. "L['self']._modules['fc']._parameters['weight']"

    @property
    def key(self) -> Key:
        return input_key(self.index)


@dataclass
class Stage:
    """One pipeline stage of a plan: its torch-level graph, its joint graph and its pieces (F, B, W), and what crosses
    its boundaries."""
    index: int
    # The stage's torch-level graph (partition_stages): placeholders in:<i> / act:<name>, outputs act: / out:.
    graph: fx.GraphModule | None = None
    example_inputs: list[Any] = field(default_factory=list)
    joint: fx.GraphModule | None = None
    pieces: dict[PieceName, fx.GraphModule] = field(default_factory=dict)
    # The unsplit backward, kept for inspection and for checking the split against it.
    backward: fx.GraphModule | None = None
    # record_boundaries: (act key, shape, dtype) this stage receives going forward / gradients coming back.
    receives_forward: list[tuple[Key, tuple, Any]] = field(default_factory=list)
    receives_backward: list[tuple[Key, tuple, Any]] = field(default_factory=list)

    @property
    def forward(self) -> fx.GraphModule | None:
        return self.pieces.get(PieceName.FORWARD)

    @property
    def backward_input(self) -> fx.GraphModule | None:
        return self.pieces.get(PieceName.BACKWARD_INPUT)

    @property
    def backward_weight(self) -> fx.GraphModule | None:
        return self.pieces.get(PieceName.BACKWARD_WEIGHT)

    def graphs(self) -> dict[str, fx.GraphModule]:
        """Every graph this stage holds (its torch-level graph, joint, unsplit backward, pieces), by name."""
        named = {"graph": self.graph, "joint": self.joint, "backward": self.backward, **self.pieces}
        return {k: v for k, v in named.items() if v is not None}


@dataclass
class PassRecord:
    """A pass that ran on the plan and how long it took."""
    name: str
    seconds: float


@dataclass
class Plan:
    """What the backend built for one input signature; `zb.explain` returns it."""

    graph: fx.GraphModule  # the Dynamo graph (fuse_attention replaces it with a copy holding the fused calls)
    inputs: list[InputSpec]
    example_inputs: list[Any]  # one microbatch's inputs, in Dynamo's order
    num_outputs: int
    training: bool
    options: Options
    num_stages: int = 1
    # Measured F+B+W seconds per stage of an earlier plan with these cuts: partition_stages re-balances with them.
    measured_stage_times: tuple[float, ...] | None = None
    previous_cuts: tuple[int, ...] | None = None
    # Dynamo's graph at the full batch, when `graph` was re-traced at microbatch size (normalize_loss compares them).
    batch_graph: fx.GraphModule | None = None
    # analyze_batch: the batch dims of every value and the operations that mix samples (a BatchAnalysis); None
    # when the batch is not split.
    batch: Any = None
    # normalize_loss: how microbatch losses make the step's loss (a LossSpec).
    loss: Any = None
    # The fraction of the total cost a cut may move from the even split to cross fewer bytes (None: the pass's
    # default); a re-cut on measured times passes a smaller one (zb/adapt.py).
    balance_window: float | None = None
    # zb-auto without 'stages': which placement won (stages per rank) and why (zb/pipeline.py); else "".
    placement: str = ""
    # precision_policy: input index -> the dtype of the copy the runtime makes of that parameter once per step, and
    # the tensors (shaped like the copies) the stages are traced with in place of `example_inputs`.
    copies: dict = field(default_factory=dict)
    traced_inputs: dict = field(default_factory=dict)
    # The autocast state the call was made under (device type -> dtype of each enabled device): autocast_regions.
    autocast: dict = field(default_factory=dict)
    # Option release: (cuts, operations) of the model's first plan, whose cuts every later plan of the model keeps
    # (another input shape, evaluation), so that each rank's stages read only what it holds (zb/model_state.py).
    keep_cuts: tuple[tuple[int, ...], tuple[str, ...]] | None = None
    cuts: tuple[int, ...] = ()  # where each stage after the first begins, in Dynamo's node order
    operations: tuple[str, ...] = ()  # partition_stages: the operation of each node it cuts between, in order
    # What partition_stages expects each stage to cost: seconds when it re-cut on measured times, else FLOPs.
    stage_costs: tuple[float, ...] = ()
    stages: list[Stage] = field(default_factory=list)
    # assign_updates: parameter indices each stage updates right after its last W; parameters whose gradient
    # several stages produce (tied weights), updated at the end of the step.
    updates: dict[int, list[int]] = field(default_factory=dict)
    shared_updates: list[int] = field(default_factory=list)
    # fuse_attention: every candidate (SDPA call or softmax) and what was done with it (AttentionSite).
    attention: list[Any] = field(default_factory=list)
    counters: collections.Counter = field(default_factory=collections.Counter)
    history: list[PassRecord] = field(default_factory=list)

    @property
    def splits(self) -> int:
        """How many parts the global batch is cut into: microbatches x data-parallel replicas."""
        return self.options.microbatches * self.options.data_parallel

    @property
    def parameters(self) -> list[InputSpec]:
        return [s for s in self.inputs if s.kind == "parameter"]

    def grad_producers(self) -> dict[int, frozenset[int]]:
        """Input index -> the stages whose B or W outputs a gradient for it (several: a tied weight), the one
        derivation the fused updates (passes/assign_updates.py) and the runtime's gradient sums
        (codegen/program.py) both read."""
        producers: dict[int, set[int]] = {}
        for stage in self.stages if self.training else ():
            for gm in (stage.backward_input, stage.backward_weight):
                for key in output_keys(gm) if gm is not None else ():
                    if key is not None and key.is_(Kind.IN, Role.GRAD):
                        producers.setdefault(key.index, set()).add(stage.index)
        return {index: frozenset(stages) for index, stages in sorted(producers.items())}

    def summary(self) -> str:
        """A readable account of what was built: inputs, pieces with op counts, counters, pass times."""
        lines = [
            f"zb plan: {len(self.stages)} stage(s), {'training' if self.training else 'inference'}, "
            f"options {self.options.changed() or 'default'}",
            f"inputs: {sum(s.kind == 'parameter' for s in self.inputs)} parameters, "
            f"{sum(s.kind == 'buffer' for s in self.inputs)} buffers, "
            f"{sum(s.kind == 'input' for s in self.inputs)} user inputs "
            f"({', '.join(s.name for s in self.inputs if s.kind == 'input')})",
        ]
        if self.placement:
            lines.append(f"placement: {self.placement}")
        for stage in self.stages:
            for name in PIECES:
                gm = stage.pieces.get(name)
                if gm is None:
                    lines.append(f"  stage {stage.index} {name:<16} (empty)")
                    continue
                ops = op_counts(gm)
                top = ", ".join(f"{op} x{n}" for op, n in ops.most_common(6))
                lines.append(
                    f"  stage {stage.index} {name:<16} {sum(ops.values()):4d} ops, "
                    f"{len(input_keys(gm))} inputs -> {len(output_keys(gm))} outputs   [{top}]"
                )
        for stage in self.stages[1:]:
            sent = ", ".join(f"{k} {list(shape)} {str(dtype).replace('torch.', '')}"
                             for k, shape, dtype in stage.receives_forward)
            lines.append(f"  stage {stage.index - 1} -> {stage.index}: {sent or 'nothing'} "
                         f"(gradients back: {len(self.stages[stage.index - 1].receives_backward)})")
        for index, params in self.updates.items():
            if params:
                lines.append(f"  stage {index} update: {type(self.options.optimizer).__name__} fused over "
                             f"{len(params)} parameters, after its last W")
        if self.shared_updates:
            lines.append(f"  shared update (gradients summed over stages): "
                         f"{', '.join(self.inputs[i].name for i in self.shared_updates)}")
        if self.loss is not None and self.training:
            lines.append(self.loss.describe())
        fused = [a for a in self.attention if a.fused]
        left = [a for a in self.attention if not a.fused]
        if self.attention:
            lines.append(f"attention: {len(fused)} fused into zb.flash_attention, {len(left)} left alone")
            lines.extend(f"  {site}" for site in self.attention)
        if self.counters:
            lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items())))
        if self.history:
            lines.append("passes: " + ", ".join(f"{r.name} {r.seconds * 1e3:.0f} ms" for r in self.history))
        return "\n".join(lines)


def input_keys(gm: fx.GraphModule) -> list[Key]:
    return [n.meta["zb_key"] for n in gm.graph.find_nodes(op="placeholder")]


def output_keys(gm: fx.GraphModule) -> list[Key | None]:
    return gm.meta["zb_output_keys"]


def output_values(gm: fx.GraphModule) -> list[Any]:
    """The output node's arguments, flattened to one list (graphs here return a flat tuple)."""
    (out,) = gm.graph.find_nodes(op="output")
    values = out.args[0]
    return list(values) if isinstance(values, (tuple, list)) else [values]


def ancestors(roots: list[Any]) -> set[fx.Node]:
    """The nodes among `roots` and every node they depend on."""
    return _reachable([r for r in roots if isinstance(r, fx.Node)], lambda node: node.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that depends on `node` (not `node` itself)."""
    return _reachable(list(node.users), lambda n: n.users)


def _reachable(start: list[fx.Node], step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def nbytes(value: Any, sizes: dict | None = None) -> int:
    """Bytes of a tensor (real or fake), or of a tuple or list of them; 0 for anything else. A symbolic size counts
    at `sizes` (symbol -> int), or at the size it was traced with when `sizes` is None (see `concrete`)."""
    if isinstance(value, torch.Tensor):
        return concrete(value.numel(), sizes) * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v, sizes) for v in value)
    return 0


def concrete(size: Any, sizes: dict | None = None) -> int:
    """An int for a size of a traced value: itself when static; for a symbolic one (a sequence length traced with
    dynamic shapes) its value at `sizes` (symbol -> int), or the example's when `sizes` is None. Reads the
    expression, so the size is not specialised (no guard is added to the trace's shape environment)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    expr = torch_internals.sym_expr(size)
    if sizes is None:
        return torch_internals.sym_hint(size)
    expr = expr.xreplace({k: v for k, v in sizes.items() if k in expr.free_symbols})
    if getattr(expr, "free_symbols", None):  # a size no input shows (a recomputed dropout's RNG state): as traced
        expr = expr.xreplace(torch_internals.traced_values(size))
    return int(expr)


def concrete_shape(shape: Sequence[Any], sizes: dict | None = None) -> tuple[int, ...]:
    return tuple(concrete(d, sizes) for d in shape)


def size_symbols(graph: fx.GraphModule, inputs: Sequence[InputSpec]) -> list[tuple[Any, int, int | None]]:
    """Where the call shows each symbolic size of `graph` (traced with dynamic shapes): (symbol, index of the plan
    input, dim), dim None for an input that is the size itself. Empty for a static graph."""
    found: dict[Any, tuple[int, int | None]] = {}
    for spec, node in zip(inputs, graph.graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value", node.meta.get("val"))
        dims = [(None, value)] if isinstance(value, torch.SymInt) else \
            list(enumerate(value.shape)) if isinstance(value, torch.Tensor) else []
        for dim, size in dims:
            if isinstance(size, torch.SymInt) and torch_internals.sym_expr(size).is_Symbol:
                found.setdefault(torch_internals.sym_expr(size), (spec.index, dim))
    return [(symbol, index, dim) for symbol, (index, dim) in found.items()]


def op_counts(gm: fx.GraphModule) -> collections.Counter:
    """How many times each operator is called, by its short name (aten.mm, aten.add, ...)."""
    counts: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = node.target
            name = getattr(target, "__name__", str(target))
            schema = torch_internals.op_schema(target)
            if schema is not None:
                name = f"{target.namespace}.{schema.name.split('::')[-1]}"
            counts[name] += 1
    return counts


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph (node names and meta kept), so the caller's graph stays as is."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    if isinstance(out, tuple):
        out, node = out
        graph.output(out, type_expr=getattr(node, "type", None))
    else:
        graph.output(out)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def fake_like(value: Any, requires_grad: bool) -> Any:
    """A fresh fake tensor of `value`'s (fake, possibly symbolic) shape, strides and dtype in its fake mode."""
    if not isinstance(value, torch.Tensor):
        return value
    made = run_fake(lambda: torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device),
                    value)
    return made.requires_grad_(requires_grad)


def run_fake(fn, *values, mode=None):
    """fn() inside fake-tensor `mode`, or that of `values`' fake tensors (as is without one): example values of new
    nodes. Give the graph's mode for a node that may read no tensor (torch.arange), which would run for real."""
    import contextlib

    if mode is None:
        mode = torch_internals.detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with mode if mode is not None else contextlib.nullcontext():
        return fn()
