"""The executable program codegen hands the runtime: everything a step needs, as data, and no FX graph.

    compiled = compile_plan(plan, stages={0})          # the pieces this process runs
    program = build_program(plan, compiled)            # what the runtime reads, with the schedule

A `Program` holds, per stage, each piece's calling convention (the keys it reads, where each output goes, what
is freed after it, what counts as activation memory) and its compiled callable where this process runs it; the
boundary tensors each stage receives (key, shape, dtype, device); the activation bytes one microbatch leaves
for B and for W (the simulator's M_B and M_W); and for the whole model one table of which stages produce the
gradient of each input, which parameters several ranks share, and which parameters each stage's fused update
covers. Everything here is worked out once from the plan's graphs, so the runtime never walks a graph and no
two runtime modules derive the same fact twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from zb.codegen.accumulate import runnable
from zb.codegen.inductor import CompiledPiece, compile_piece
from zb.codegen.memory import PieceMemory, piece_memory
from zb.core import torch_internals
from zb.core.options import Options
# (The runtime never imports zb.passes: the names it needs, Key, Kind, PieceName and LOSS_TANGENT, come through
# here.)
from zb.passes.keys import LOSS_TANGENT as LOSS_TANGENT
from zb.passes.keys import Key, Kind, PieceName, Role, input_key, output_key
from zb.passes.plan import (
    PIECES, InputSpec, Plan, Stage, concrete, concrete_shape, input_keys, nbytes, output_keys, output_values,
    size_symbols,
)

# Where a piece's output goes.
DISCARD = "discard"  # an output nobody reads
ENV = "env"  # kept for a later piece of the same stage and microbatch (saved:, stash:, ...)
OUT = "out"  # a model output (out:<j>)
ACT = "act"  # an activation sent to the next stage
GRAD_ACT = "grad_act"  # the gradient of an activation, sent to the stage before
GRAD_SLICE = "grad_slice"  # the gradient of one microbatch of a batched input (concatenated after the step)
GRAD_SUM = "grad_sum"  # the gradient of an unbatched input (a parameter): summed over microbatches


@dataclass(frozen=True)
class TensorSpec:
    """A tensor known before the step runs: the key it travels under, its shape, dtype and device."""

    key: Key
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize

    def empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class Route:
    """Where one output of a piece goes: `kind` (ENV, OUT, ...), its key, the output or input index it is for
    (-1 if none), and whether its bytes count as activation memory."""

    kind: str
    key: Key | None
    index: int
    counted: bool


@dataclass
class Piece:
    """One F, B or W of a stage: its calling convention, and `run` where this process runs it (else None)."""

    name: PieceName
    stage: int
    inputs: list[Key]
    routes: list[Route]
    drops: list[tuple[Key, bool]]  # (key, counted) of the values no later piece of the microbatch reads
    memory: PieceMemory  # bytes it holds while running; which outputs are new tensors (codegen/memory.py)
    run: CompiledPiece | None = None
    # The step's gradient sums it adds into, in place (grad:in:<i> inputs; codegen/accumulate.py).
    sums: list[TensorSpec] = field(default_factory=list)


@dataclass
class StageProgram:
    """One stage as the runtime runs it: its device, compiled pieces, boundary specs and the inputs it reads."""
    index: int
    device: torch.device  # where its parameters, inputs and boundary tensors live
    pieces: dict[PieceName, Piece]
    receives_forward: list[TensorSpec]  # the activations F receives from the stage before, in sending order
    receives_backward: list[TensorSpec]  # the activations whose gradients B receives from the stage after
    reads: frozenset[int]  # plan inputs (parameters, buffers, user inputs) this stage's pieces read
    memory_b: float  # bytes F leaves for the backward, per microbatch (the simulator's M_B)
    memory_w: float  # bytes B leaves for W, per microbatch (M_W)
    random: bool = False  # its forward draws random numbers (dropout): each microbatch gets its own seed


@dataclass
class LossProgram:
    """How microbatch losses make the step's loss (passes/normalize_loss.py has the rules):
    `mode` "mean" (seed 1/m, average), "sum" (seed 1, add) or "weighted" (the weights below are inputs of the
    last stage; seed 1, add). `weights`: (plan input index, kind, denominator index) of each weight: MEAN 1/m,
    SUM 1, RATIO 1 / (that denominator summed over the microbatches). `outputs`: how each model output combines
    ("loss", "mean", "sum", ("ratio", d), ("concat", dim), "first"). `denominator`: one microbatch's inputs -> every
    denominator (None when there is none)."""

    mode: str
    weights: list[tuple[int, str, int]]
    outputs: list[Any]
    learned: list[bool]  # per output: it depends on a parameter, so eager would let it require grad
    denominator: CompiledPiece | None = None


@dataclass
class Program:
    """What the runtime executes: every stage's compiled pieces with their routing, inputs, outputs, loss rules and
    gradient producers, as data (no FX graph)."""
    training: bool
    options: Options
    inputs: list[InputSpec]
    input_specs: list[TensorSpec | None]  # one microbatch of each input (a parameter whole); None: not a tensor
    outputs: list[TensorSpec | None]  # one microbatch of each model output, as the last stage produces it
    stages: list[StageProgram]
    grad_producers: dict[int, frozenset[int]]  # input index -> the stages whose backward produces its gradient
    updates: dict[int, list[int]] = field(default_factory=dict)  # stage -> parameters its fused update covers
    shared_updates: list[int] = field(default_factory=list)  # parameters updated once their gradient is summed
    loss: LossProgram | None = None  # training: how microbatch losses make the step's loss
    # Mixed precision (options param_dtype / reduce_dtype): parameter index -> the dtype of the copy the runtime
    # makes once per step; the dtype parameter gradients are summed in (None: their own).
    copies: dict[int, torch.dtype] = field(default_factory=dict)
    reduce_dtype: torch.dtype | None = None
    # The lower-precision dtypes autocast or the policy computes in (empty: the graph's own dtypes throughout).
    compute_dtypes: frozenset = frozenset()
    # A plan traced with symbolic sizes: (symbol, input index, dim) where each call shows each symbol, the sizes
    # the shapes and bytes above are evaluated at, and how to evaluate them at others (build_program).
    symbols: list[tuple[Any, int, int | None]] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    rebuild: Any = None

    memory_sizes: dict = field(default_factory=dict)  # the sizes the byte counts (memory_b, piece memory) are at

    def bind(self, args: Sequence[Any]) -> None:
        """Evaluate the tensor shapes for this call's sizes (a symbolic plan; nothing to do for a static one): a few
        expressions per call. In place: the runtime's parts hold this program and its lists. The byte counts
        follow when read (`refresh_memory`)."""
        if not self.symbols:
            return
        sizes = {symbol: int(args[index] if dim is None else args[index].shape[dim])
                 for symbol, index, dim in self.symbols}
        if sizes == self.sizes:
            return
        input_specs, outputs, boundaries = self.rebuild(sizes, specs_only=True)
        self.input_specs[:] = input_specs
        self.outputs[:] = outputs
        for mine, (forward, backward) in zip(self.stages, boundaries):
            mine.receives_forward[:] = forward
            mine.receives_backward[:] = backward
            for piece in mine.pieces.values():
                if piece.run is not None:
                    piece.run.sizes = sizes  # (a boundary's strides may need a size its shape does not show)
        self.sizes = sizes

    def refresh_memory(self) -> None:
        """The byte counts (each stage's memory_b and memory_w, each piece's memory) at the bound sizes: what reads
        them (the memory replay, the cost model) calls this first. Walks the plan's graphs once per new size."""
        if not self.symbols or self.memory_sizes == self.sizes:
            return
        fresh = self.rebuild(self.sizes)
        for mine, theirs in zip(self.stages, fresh.stages):
            mine.memory_b, mine.memory_w = theirs.memory_b, theirs.memory_w
            for name, piece in mine.pieces.items():
                piece.memory = theirs.pieces[name].memory
        self.memory_sizes = dict(self.sizes)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    @property
    def microbatches(self) -> int:
        return self.options.microbatches

    def producer_ranks(self, index: int, placement: Sequence[int]) -> list[int]:
        """The ranks whose stages produce input `index`'s gradient, in order."""
        return sorted({placement[s] for s in self.grad_producers.get(index, ())})

    def shared_gradients(self, placement: Sequence[int]) -> dict[int, list[int]]:
        """Input index -> the ranks producing its gradient, for inputs whose gradient more than one rank produces
        (tied parameters, an input several stages read)."""
        ranks = {index: self.producer_ranks(index, placement) for index in sorted(self.grad_producers)}
        return {index: r for index, r in ranks.items() if len(r) > 1}

    def readers(self, placement: Sequence[int]) -> dict[int, set[int]]:
        """Plan input index -> the ranks whose stages read it."""
        found: dict[int, set[int]] = {}
        for stage in self.stages:
            for index in stage.reads:
                found.setdefault(index, set()).add(placement[stage.index])
        return found


def build_program(plan: Plan, compiled: dict[tuple[int, PieceName], CompiledPiece], sizes: dict | None = None
                  ) -> Program:
    """The runtime's view of `plan`, with the compiled pieces of the stages this process runs. A plan traced with
    symbolic sizes (a sequence length) gives a program whose shapes and bytes are those at `sizes` (symbol ->
    int; None: the traced example's), and that `Program.bind` re-evaluates for each call's sizes."""
    input_specs, outputs, boundaries = _specs(plan, sizes)
    stages = [_stage_program(plan, stage, compiled, sizes, *received)
              for stage, received in zip(plan.stages, boundaries)]
    program = Program(
        training=plan.training,
        options=plan.options,
        inputs=list(plan.inputs),
        input_specs=input_specs,
        outputs=outputs,
        stages=stages,
        grad_producers=plan.grad_producers(),
        updates={s: list(v) for s, v in plan.updates.items()},
        shared_updates=list(plan.shared_updates),
        loss=_loss_program(plan),
        copies=dict(plan.copies),
        compute_dtypes=frozenset(dtype for node in plan.graph.graph.nodes
                                 for _, dtype in node.meta.get("zb_autocast", ())) | frozenset(plan.copies.values()),
        reduce_dtype=plan.options.reduce_dtype,
    )
    program.symbols = size_symbols(plan.graph, plan.inputs)
    if program.symbols:
        traced = _traced_inputs(plan)
        program.sizes = sizes if sizes is not None else {
            symbol: concrete(traced[index] if dim is None else traced[index].shape[dim])
            for symbol, index, dim in program.symbols}
        program.memory_sizes = dict(program.sizes)
        for stage in program.stages:
            for piece in stage.pieces.values():
                if piece.run is not None:
                    piece.run.sizes = program.sizes
        program.rebuild = lambda bound, specs_only=False: _specs(plan, bound) if specs_only else \
            build_program(plan, compiled, bound)
    return program


def _specs(plan: Plan, sizes: dict | None) -> tuple[list, list, list[tuple[list, list]]]:
    """The tensor shapes of a program at `sizes` (its input specs, output specs, and each stage's boundaries, as
    received going forward and backward): what Program.bind evaluates per call, without walking the graphs."""
    last = plan.stages[-1].forward
    outs = {key: value for key, value in zip(output_keys(last), _output_meta(last))
            if key is not None and key.is_(Kind.OUT)}
    boundaries = [([_boundary(k, shape, dtype, stage.forward, sizes) for k, shape, dtype in stage.receives_forward],
                   [_boundary(k, shape, dtype, stage.forward, sizes) for k, shape, dtype in stage.receives_backward])
                  for stage in plan.stages]
    return ([_spec(input_key(i), value, sizes) for i, value in enumerate(_traced_inputs(plan))],
            [_spec(output_key(j), outs.get(output_key(j)), sizes) for j in range(plan.num_outputs)], boundaries)


def _traced_inputs(plan: Plan) -> list[Any]:
    """One microbatch of each plan input as traced: real values, or (symbolic sizes) the graph's fake ones."""
    if not size_symbols(plan.graph, plan.inputs):
        return plan.example_inputs
    return [node.meta.get("example_value") for node in plan.graph.graph.find_nodes(op="placeholder")]


def _loss_program(plan: Plan) -> LossProgram | None:
    loss = plan.loss
    if loss is None:
        return None
    # The denominator graph is a few operations on the targets, once per microbatch: it runs as it is.
    denominator = compile_piece(loss.denominator, PieceName.DENOMINATOR, -1, "eager") if loss.denominator else None
    return LossProgram(loss.mode, list(loss.weights), list(loss.outputs), list(loss.learned), denominator)


def _stage_program(plan: Plan, stage: Stage, compiled: dict[tuple[int, PieceName], CompiledPiece], sizes: dict | None,
                   receives_forward: list[TensorSpec], receives_backward: list[TensorSpec]) -> StageProgram:
    graphs = [(name, runnable(stage.pieces[name], plan)) for name in PIECES if stage.pieces.get(name) is not None]
    held = _held_keys([gm for _, gm in graphs])
    pieces = {}
    for position, (name, gm) in enumerate(graphs):
        later = {k for _, other in graphs[position + 1:] for k in input_keys(other)}
        keys = output_keys(gm)
        drops = sorted((k for k in set(input_keys(gm)) | {k for k in keys if k} if k not in later), key=str)
        pieces[name] = Piece(name, stage.index, input_keys(gm), [_route(k, plan, held) for k in keys],
                             [(k, k in held) for k in drops], piece_memory(gm, sizes),
                             compiled.get((stage.index, name)), sum_specs(gm))
    forward = stage.forward
    memory_b = sum(nbytes(v, sizes) for k, v in zip(output_keys(forward), _output_meta(forward)) if k in held)
    weight = stage.backward_weight
    saved = weight.graph.find_nodes(op="placeholder") if weight else []
    memory_w = sum(nbytes(n.meta.get("val"), sizes) for n in saved if n.meta["zb_key"] in held)
    keys = [k for gm in ([stage.graph] if stage.graph is not None else []) + [gm for _, gm in graphs]
            for k in input_keys(gm)]
    reads = {k.index for k in keys if k.is_(Kind.IN)}
    return StageProgram(
        index=stage.index,
        device=_device(forward),
        pieces=pieces,
        receives_forward=receives_forward,
        receives_backward=receives_backward,
        reads=frozenset(reads),
        memory_b=float(memory_b),
        memory_w=float(min(memory_w, memory_b)),
        random=any(_draws_random(n) for n in forward.graph.nodes),
    )


def sum_specs(gm: fx.GraphModule) -> list[TensorSpec]:
    """The gradient sums a piece as it runs adds into: its grad:in:<i> placeholders, in order (static shapes:
    codegen/accumulate.py)."""
    return [TensorSpec(n.meta["zb_key"], tuple(n.meta["val"].shape), n.meta["val"].dtype, n.meta["val"].device)
            for n in gm.graph.find_nodes(op="placeholder") if n.meta["zb_key"].is_(Kind.IN, Role.GRAD)]


def _draws_random(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch_internals.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def _route(key: Key | None, plan: Plan, held: set[Key]) -> Route:
    if key is None:
        return Route(DISCARD, None, -1, False)
    if key.is_(Kind.OUT):
        return Route(OUT, key, key.index, key in held)
    if key.is_(Kind.ACT):
        return Route(ACT, key, -1, key in held)
    if key.is_(Kind.ACT, Role.GRAD):
        return Route(GRAD_ACT, key, -1, key in held)
    if key.is_(Kind.IN, Role.GRAD):
        return Route(GRAD_SLICE if plan.inputs[key.index].batched else GRAD_SUM, key, key.index, key in held)
    return Route(ENV, key, -1, key in held)


def _held_keys(pieces: list[fx.GraphModule]) -> set[Key]:
    """The saved:/stash: keys whose bytes are activation memory (not a parameter or input passed along)."""
    aliases = set()
    for gm in pieces:
        for key, node in zip(output_keys(gm), output_values(gm)):
            if key and isinstance(node, fx.Node) and node.op == "placeholder" and node.meta["zb_key"].is_(Kind.IN):
                aliases.add(key)
    keys = {k for gm in pieces for k in output_keys(gm) if k is not None and k.kind in (Kind.SAVED, Kind.STASH)}
    return keys - aliases


def _boundary(key: Key, shape: tuple, dtype: torch.dtype, forward: fx.GraphModule, sizes: dict | None
              ) -> TensorSpec:
    return TensorSpec(key, concrete_shape(shape, sizes), dtype, _device(forward))


def _device(gm: fx.GraphModule) -> torch.device:
    """The device a stage runs on: that of its parameters and inputs (the first tensor placeholder's)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _output_meta(gm: fx.GraphModule) -> list[Any]:
    return [node.meta.get("val") if isinstance(node, fx.Node) else node for node in output_values(gm)]


def _spec(key: Key, value: Any, sizes: dict | None) -> TensorSpec | None:
    if not isinstance(value, torch.Tensor):
        return None
    return TensorSpec(key, concrete_shape(value.shape, sizes), value.dtype, value.device)
