"""Building a Dynamo graph's pipelines: the plan the passes start from for a call, and the runner of a plan.

Dynamo's graph is traced at the full batch; the passes plan what one microbatch of one replica sees. When the batch
is split (microbatches > 1, or data-parallel replicas in this process) or Dynamo made the graph dynamic, that is the
same frame re-traced at microbatch size (zb/dynamo.py `FrameCapture`), its inputs found among the call's by their
Dynamo source; beside it, normalize_loss gets the graph of the global batch to weigh the loss against. A runner
compiles only this process's stages of a plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from zb import adapt
from zb.autocast import autocast_state, no_autocast
from zb.codegen import build_program, compile_plan
from zb.codegen.program import Program
from zb.core.errors import ZbOptionError, ZbUnsupportedError
from zb.core.options import Options
from zb.dynamo import FrameCapture, has_symbolic_shape, input_source
from zb.passes import InputSpec, Plan
from zb.passes.plan import concrete
from zb.pipeline import Pipeline
from zb.runtime import PipelineRunner, split_microbatches
from zb.signature import call_specs, is_size


class Planner:
    """Builds one Dynamo graph's pipelines: a call's plan before the passes, and the runner of a planned one."""

    def __init__(self, gm: fx.GraphModule, inputs: list[InputSpec], options: Options, pipeline: Pipeline, tx=None):
        """`tx`: Dynamo's translator for the frame (None when the graph did not come from Dynamo)."""
        self.gm = gm
        self.inputs = inputs
        self.options = options
        self.pipeline = pipeline
        # What the re-trace takes from each call: its tensor arguments, and the numbers among its arguments that
        # Dynamo made graph inputs (an int argument it made dynamic: the trace must see the call's value, not the
        # one the frame was first traced with).
        user_inputs = {s.index: input_source(gm, s.index) for s in inputs
                       if s.kind == "input" or (s.kind == "constant" and not is_size(s.source))}
        numbers = frozenset(s.index for s in inputs if s.kind == "constant")
        self.frame = FrameCapture(tx, user_inputs, numbers) if tx is not None else None
        nodes = gm.graph.find_nodes(op="placeholder")
        self.static = not any(s.kind == "constant" or has_symbolic_shape(n) for s, n in zip(inputs, nodes))

    def plan(self, args: Sequence[Any], training: bool, dynamic: dict[int, list[int]] | None = None, **fields: Any
             ) -> tuple[Plan, list[int]]:
        """The plan for one call's inputs as the passes get it, and for each of the plan graph's inputs its position
        in `args`; `dynamic`: per input position, the dims traced with a symbolic size; `fields`: more of the
        Plan's fields (a re-cut's measured times, the cuts option release keeps)."""
        self.pipeline.schedule_for(training)  # impossible placements fail here, on every rank, before any work
        autocast = autocast_state()  # around the call: its operations run under it (passes/autocast_regions.py)
        outer = call_specs(self.inputs, args, self.options.unbatched)
        replicas = self.pipeline.local_replicas
        batch = args  # this process's batch: every replica's with replicas in this process, else its own
        if replicas > 1:  # data parallelism in this process: the plan is one replica's
            args = _replica_part(outer, args, replicas, self.options.microbatches)
        first = split_microbatches(outer, args, self.options.microbatches)[0]
        if self.static and self.options.microbatches == 1 and replicas == 1:
            gm, specs, example, arg_map = self.gm, outer, first, list(range(len(args)))
        else:
            if self.frame is None:
                raise ZbUnsupportedError("this graph was not captured by Dynamo, so zb cannot split its batch")
            gm, example, inner = self.frame.capture({i: first[i] for i in self.frame.sources}, dynamic=dynamic)
            position = {s.source: s.index for s in outer}
            missing = [s.source for s in inner if s.source not in position]
            if missing:
                raise ZbUnsupportedError(f"re-tracing at microbatch size read inputs Dynamo did not: {missing}")
            arg_map = [position[s.source] for s in inner]
            # A size traced symbolic is the call's own number in the examples the passes run on (the graph keeps
            # the symbol; running the graph on a static example with the symbol would specialise it).
            example = [concrete(v) if isinstance(v, torch.SymInt) else v for v in example]
            specs = [replace(s, requires_grad=outer[i].requires_grad, batched=outer[i].batched)
                     for s, i in zip(inner, arg_map)]
        plan = Plan(
            graph=gm,
            inputs=specs,
            example_inputs=list(example),
            num_outputs=_num_outputs(gm),
            training=training,
            options=self.options,
            num_stages=self.pipeline.num_stages,
            autocast=autocast,
            batch_graph=self._batch_graph(batch, outer, dynamic),
            placement=self.pipeline.placement_summary,
            **fields,
        )
        return plan, arg_map

    def program(self, plan: Plan) -> Program:
        """Compile this process's stages of `plan`: the program the runtime runs."""
        schedule = self.pipeline.schedule_for(plan.training)
        stages = {s for s, r in enumerate(schedule.placement) if r in self.pipeline.local_ranks}
        with no_autocast():
            return build_program(plan, compile_plan(plan, stages=stages))

    def runner(self, plan: Plan, measure_first: bool | None = None, program: Program | None = None
               ) -> PipelineRunner:
        """What runs `plan` in this process, compiling its stages here unless `program` is the compiled one;
        `measure_first`: whether its first step is measured for a re-cut (by default: when one may happen)."""
        pipeline = self.pipeline
        program = program if program is not None else self.program(plan)
        if measure_first is None:
            options = plan.options
            measure_first = plan.training and plan.num_stages > 1 and options.rebalance and not options.split_points
        runner = PipelineRunner(program, pipeline.schedule_for(plan.training), pipeline.local_ranks, pipeline.comm(),
                                pipeline.replicas, pipeline.replica_comm(), pipeline.replica)
        return adapt.configure(runner, measure_first=measure_first)

    def _batch_graph(self, batch: Sequence[Any], outer: list[InputSpec], dynamic: dict[int, list[int]] | None = None
                     ) -> fx.GraphModule | None:
        """The graph of the global batch at static shapes (but the `dynamic` dims, symbolic as in the split's
        graph), which normalize_loss compares with the graph of one split
        (passes/normalize_loss.py): the batch eager would see, every replica's batch together, n = microbatches x
        data_parallel times a split's samples. None when n = 1 (nothing is split: nothing to compare).

        `batch` is this process's: with the replicas in this process, the global batch itself; under torchrun,
        this replica's, and the global batch is traced as D copies of it (the analysis reads only the graph's
        shapes and the numbers baked into it, which depend on the batch size, not on the values). Dynamo's own
        graph serves when it is static and there is one replica."""
        replicas = self.pipeline.replicas
        if self.options.microbatches * replicas == 1:
            return None
        if self.static and replicas == 1:
            return self.gm
        if self.frame is None:
            raise ZbUnsupportedError("this graph was not captured by Dynamo, so zb cannot trace the global batch "
                                     "it must weigh the loss against")
        copies = replicas // self.pipeline.local_replicas  # this process's batches in the global one
        full, _, _ = self.frame.capture({s.index: _tiled(batch[s.index], copies) if s.batched else batch[s.index]
                                         for s in outer if s.index in self.frame.sources}, dynamic=dynamic)
        return full


def _replica_part(specs: list[InputSpec], args: Sequence[Any], replicas: int, microbatches: int) -> list[Any]:
    """The first replica's arguments, when `replicas` run in this process on parts of the batch."""
    sizes = {specs[i].name: a.shape[0] for i, a in enumerate(args) if specs[i].batched}
    for name, size in sizes.items():
        if size % (replicas * microbatches):
            raise ZbOptionError(
                f"input {name!r} has batch size {size}, which data_parallel={replicas} replicas of "
                f"microbatches={microbatches} do not divide; use a batch size that is a multiple of "
                f"{replicas * microbatches}")
    return split_microbatches(specs, args, replicas)[0]


def _tiled(value: Any, copies: int) -> Any:
    """`copies` replicas' batches of `value`'s shape, along dim 0 (a leaf, requiring grad as `value` does)."""
    if copies == 1:
        return value
    return value.detach().repeat(copies, *([1] * (value.dim() - 1))).requires_grad_(value.requires_grad)


def _num_outputs(gm: fx.GraphModule) -> int:
    (out,) = gm.graph.find_nodes(op="output")
    return len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1
