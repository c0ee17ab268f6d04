"""Hand each F/B/W piece to Inductor (C++ on CPU, Triton on GPU), or keep it as FX for compiler="eager".

Pieces are compiled separately because the runtime calls them separately and in a schedule's order; the
example inputs are the fake tensors the passes left in each placeholder's meta["val"].
"""

from __future__ import annotations

import copy
import logging
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from zb.codegen.accumulate import runnable
from zb.core import torch_internals
from zb.ops.attention import lower_to_cpu_kernels
from zb.passes.keys import Key, Kind, PieceName, Role
from zb.passes.plan import PIECES, PassRecord, Plan, input_keys, output_keys
from zb.passes.runner import dump_plan

log = logging.getLogger(__name__)


@dataclass
class CompiledPiece:
    """A runnable piece: `piece(args)` takes the values of `inputs` in order and returns those of `outputs`."""

    name: str
    stage: int
    inputs: list[Key]
    outputs: list[Key | None]
    run: Callable[[list[Any]], Any]
    # (position, strides) of the inputs that cross a stage boundary (act:, tangent:), as the graph was traced:
    # the same value arrives with other strides by another path (a contiguous receive buffer, or the previous
    # stage's output on the same rank), and a graph traced for one layout may view its input as only that allows.
    layouts: list[tuple[int, Any]]  # (strides, or _SymbolicStrides for symbolic sizes)
    source_code: str | None = None  # Inductor's generated module, when compiled with Inductor

    # A plan traced with symbolic sizes: each symbol's value in the current call (codegen/program.py Program.bind).
    sizes: dict = field(default_factory=dict)

    def __call__(self, args: list[Any]) -> tuple:
        for position, strides in self.layouts:
            value = args[position]
            want = strides(value.shape, self.sizes) if callable(strides) and isinstance(value, torch.Tensor) \
                else strides
            if want is not None:
                args[position] = _in_layout(value, want)
        return tuple(self.run(args))


class _SymbolicStrides:
    """The strides a boundary input was traced with, in the symbolic sizes of its own shape (a plan traced with a
    symbolic length): evaluated at each call's shape."""

    def __init__(self, strides: tuple, dims: dict):
        self.strides, self.dims = strides, dims  # sympy expressions; symbol -> the dim whose size it is

    def __call__(self, shape: torch.Size, bound: dict) -> tuple[int, ...] | None:
        """The strides at this shape, with the call's `bound` sizes for symbols the shape does not show
        (`h[:, -1]` of a [m, L, d] value: strides (L*d, 1)); None if some symbol has no value."""
        sizes = {**bound, **{symbol: shape[dim] for symbol, dim in self.dims.items()}}
        strides = [s.xreplace(sizes) if hasattr(s, "xreplace") else s for s in self.strides]
        if any(getattr(s, "free_symbols", None) for s in strides):
            return None
        return tuple(int(s) for s in strides)


def boundary_layouts(gm: fx.GraphModule) -> list[tuple[int, tuple[int, ...] | _SymbolicStrides]]:
    found = []
    for position, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("val")
        key = node.meta.get("zb_key")
        crosses = key is not None and (key.is_(Kind.ACT) or key.role is Role.TANGENT)
        if not (crosses and isinstance(value, torch.Tensor)):
            continue
        if all(isinstance(s, int) for s in value.stride()):
            found.append((position, tuple(value.stride())))
            continue
        strides = tuple(torch_internals.sym_expr(s) if isinstance(s, torch.SymInt) else s for s in value.stride())
        dims = {torch_internals.sym_expr(d): i for i, d in enumerate(value.shape)
                if isinstance(d, torch.SymInt) and torch_internals.sym_expr(d).is_Symbol}
        found.append((position, _SymbolicStrides(strides, dims)))
    return found


def _in_layout(value: Any, strides: tuple[int, ...]) -> Any:
    """`value` itself when its strides match wherever they matter (dimensions longer than 1), else a copy."""
    if not isinstance(value, torch.Tensor) or all(
            size <= 1 or have == want for size, have, want in zip(value.shape, value.stride(), strides)):
        return value
    return torch.empty_strided(value.shape, strides, dtype=value.dtype, device=value.device).copy_(value)


def compile_plan(plan: Plan, dump_dir: str | None = None, stages: set[int] | None = None
                 ) -> dict[tuple[int, PieceName], CompiledPiece]:
    """Compile every piece of the given stages (default: all); returns {(stage index, piece name): piece}."""
    start = time.perf_counter()
    compiled = {}
    for stage in plan.stages:
        if stages is not None and stage.index not in stages:
            continue
        for name in PIECES:
            gm = stage.pieces.get(name)
            if gm is not None:
                compiled[(stage.index, name)] = compile_piece(runnable(gm, plan), name, stage.index,
                                                              plan.options.compiler)
    seconds = time.perf_counter() - start
    plan.history.append(PassRecord("codegen", seconds))
    log.info("codegen (%s): %d pieces in %.1f s", plan.options.compiler, len(compiled), seconds)
    dump_dir = dump_dir if dump_dir is not None else os.environ.get("ZB_DUMP_DIR")
    if dump_dir:
        final = pathlib.Path(dump_dir) / "final"
        dump_plan(plan, final)
        for (index, name), piece in compiled.items():
            running = runnable(plan.stages[index].pieces[name], plan)
            if running is not plan.stages[index].pieces[name]:  # what runs: gradients added into the step's sums
                (final / f"stage{index}_{name}.running.py").write_text(running.code)
            if piece.source_code:
                (final / f"stage{index}_{name}.inductor.py").write_text(piece.source_code)
    return compiled


def compile_piece(gm: fx.GraphModule, name: PieceName, stage: int, compiler: str) -> CompiledPiece:
    inputs, outputs = input_keys(gm), output_keys(gm)
    # The plan keeps the graph the passes produced; what runs is a copy (Inductor's post-grad passes rewrite the
    # graph in place) with the fused attention calling PyTorch's CPU kernels directly where it runs on CPU.
    target = copy.deepcopy(gm)
    lower_to_cpu_kernels(target)
    layouts = boundary_layouts(gm)
    if compiler == "eager":
        return CompiledPiece(name, stage, inputs, outputs, lambda args: target(*args), layouts)
    example = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]
    # zb's Triton operators stay opaque calls (on CPU Inductor cannot trace into Triton kernels: no driver).
    with torch.no_grad(), torch_internals.custom_triton_ops_opaque():
        output_code = torch_internals.inductor_compile(target, example)
    return CompiledPiece(name, stage, inputs, outputs, lambda args: output_code(list(args)), layouts,
                         source_code=getattr(output_code, "source_code", None))

