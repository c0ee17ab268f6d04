"""The `zb` torch.compile backend: Dynamo graph -> passes -> codegen -> runtime.

`torch.compile(model, backend="zb", options={...})` reaches `zb_backend` through the `torch_dynamo_backends`
entry point. `ZbBackend` is the object behind it: it keeps every graph it compiled (`backend.graphs`) and, per
graph, the plan it built for each input signature, so tests and `zb.explain` can look inside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from zb.codegen import compile_plan
from zb.errors import ZbUnsupportedError
from zb.frame import FrameCapture, describe_inputs, placeholders
from zb.options import REBALANCE_ABOVE, Options
from zb.passes import PASSES, InputSpec, Plan, partition_stages, run_passes
from zb.passes.partition_stages import split_points_for
from zb.pipeline import Pipeline
from zb.runtime import PipelineRunner, split_microbatches
from zb.runtime.migrate import migrate, moves

log = logging.getLogger(__name__)


class ZbBackend:
    """A torch.compile backend object. `codegen=False` builds plans but runs the Dynamo graph eagerly."""

    def __init__(self, options: dict[str, Any] | Options | None = None, *, codegen: bool = True):
        self.options = Options.from_dict(options)
        self.codegen = codegen
        self.graphs: list[CompiledGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> CompiledGraph:
        if kwargs.get("options") is not None:
            raise ZbUnsupportedError("pass options to ZbBackend(...) or to backend='zb', not both")
        tx = _reject_graph_break(gm)
        compiled = CompiledGraph(gm, example_inputs, self.options, tx=tx, codegen=self.codegen)
        self.graphs.append(compiled)
        return compiled

    @property
    def plans(self) -> list[Plan]:
        return [plan for graph in self.graphs for plan in graph.plans.values()]

    @property
    def runners(self) -> list[PipelineRunner]:
        """What runs each compiled signature: its schedule, measured timeline, memory, per graph in order."""
        return [runner for graph in self.graphs for runner, _ in graph._built.values() if runner is not None]


def zb_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **kwargs: Any):
    """The function registered as backend "zb"; `options` comes from torch.compile(..., options={...})."""
    return ZbBackend(options)(gm, example_inputs, **kwargs)


class CompiledGraph:
    """What Dynamo calls in place of one graph: builds (once per input signature) and runs a plan.

    Dynamo's graph is traced at the full batch. When the batch is split (microbatches > 1) or Dynamo made the
    graph dynamic, the plan is built from the same frame re-traced at microbatch size (see zb/frame.py).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                 tx=None, codegen: bool = True):
        """`tx`: Dynamo's translator for the frame (None when the graph did not come from Dynamo)."""
        self.gm = gm
        self.options = options
        self.codegen = codegen
        self.inputs = describe_inputs(gm, example_inputs)
        user_inputs = {s.index: _source(gm, s.index) for s in self.inputs if s.kind == "input"}
        self.frame = FrameCapture(tx, user_inputs) if tx is not None else None
        self.static = not any(
            s.kind == "constant" or _has_symbolic_shape(n) for s, n in zip(self.inputs, placeholders(gm))
        )
        self.pipeline = Pipeline(options)
        self.plans: dict[tuple, Plan] = {}
        self._built: dict[tuple, tuple[PipelineRunner | None, list[int]]] = {}

    def __call__(self, *args: Any) -> Any:
        training = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        )
        key = (training, *(_signature(a) for a in args))
        if key not in self._built:
            plan, arg_map = self.build_plan(args, training)
            self.plans[key] = plan
            self._built[key] = (self._runner(plan) if self.codegen else None, arg_map)
        runner, arg_map = self._built[key]
        if runner is None:
            return self.gm(*args)
        if _needs_rebalancing(runner) and not runner.distributed:  # one process: re-cut before the next step
            runner = self._rebalance(key, runner, args)
        result = runner(*[args[i] for i in arg_map])
        if runner.distributed and _needs_rebalancing(runner):
            if runner.optimizer is not None:
                self._suggest_split_points(runner)
            else:  # before the user's first optimizer.step(): move parameters and this step's gradients
                self._rebalance_across_ranks(key, runner, args)
        return result

    def _suggest_split_points(self, runner: PipelineRunner) -> None:
        """With options["optimizer"] across processes the stages stay where they are (the fused update already
        ran on the old owners). Say once which split_points the measured times call for."""
        runner.rebalanced = True
        old = runner.plan
        probe = Plan(old.graph, old.inputs, old.example_inputs, old.num_outputs, old.training, old.options,
                     num_stages=old.num_stages, measured_stage_times=runner.stage_times(), previous_cuts=old.cuts)
        partition_stages(probe)
        suggestion = split_points_for(probe)
        if runner.ranks[0] == 0 and suggestion:
            log.warning("zb: measured stage times %s ms are unbalanced; to re-cut, start again with "
                        "options={'split_points': %s}", [round(t * 1e3, 2) for t in runner.stage_times()],
                        suggestion)

    def _rebalance(self, key: tuple, runner: PipelineRunner, args: Sequence[Any]) -> PipelineRunner:
        """Rebuild the plan with stages re-cut on measured times (in one process, where every parameter and its
        optimizer state stay put whatever stage reads them)."""
        recut = self._recut(runner, args)
        if recut is None:
            return runner
        return self._install(key, *recut, steps=runner.steps)

    def _rebalance_across_ranks(self, key: tuple, runner: PipelineRunner, args: Sequence[Any]) -> None:
        """Re-cut on the first step's measured times (the same on every rank: the measurements are gathered from
        all) and move the parameters whose stage changes rank, with this step's gradients (runtime/migrate.py)."""
        recut = self._recut(runner, args)
        if recut is None:
            return
        old, plan, arg_map = runner.plan, *recut
        if arg_map != self._built[key][1] or [(s.kind, s.name) for s in plan.inputs] != \
                [(s.kind, s.name) for s in old.inputs]:
            log.warning("zb: re-tracing for the re-cut gave different inputs; the stages stay where they are")
            return
        fresh = self._install(key, plan, arg_map, steps=runner.steps)
        values = [args[i] for i in arg_map]
        planned = moves(old, runner.schedule.placement, plan, fresh.schedule.placement)
        migrate(planned, runner.ranks[0], runner.executor.transport, values, runner.last_grads, old,
                runner.schedule.placement, plan, fresh.schedule.placement)
        if runner.ranks[0] == 0:
            log.info("zb: %d parameters and buffers moved to their new rank", len({m.index for m in planned}))

    def _recut(self, runner: PipelineRunner, args: Sequence[Any]) -> tuple[Plan, list[int]] | None:
        """The plan re-cut on the runner's measured stage times, or None when it would not make the slowest stage
        at least RECUT_GAIN quicker (as the measured costs predict). Decided once per signature."""
        runner.rebalanced = True
        old, measured = runner.plan, runner.stage_times()
        plan, arg_map = self.build_plan(args, old.training, measured=measured, previous=old.cuts)
        times = [round(t * 1e3, 2) for t in measured]
        predicted = max(plan.stage_costs, default=max(measured))
        say = log.info if runner.ranks[0] == 0 else log.debug  # every rank decides alike; one says so
        if plan.cuts == old.cuts or predicted > (1 - RECUT_GAIN) * max(measured):
            say("zb: measured stage times %s ms; no other cut makes the slowest stage %g%% quicker, the "
                     "stages stay", times, RECUT_GAIN * 100)
            return None
        say("zb: re-cut the stages on measured times %s ms: %s -> %s (slowest stage %.2f -> %.2f ms "
                 "predicted)", times, split_points_for(old) or list(old.cuts),
                 split_points_for(plan) or list(plan.cuts), max(measured) * 1e3, predicted * 1e3)
        return plan, arg_map

    def _install(self, key: tuple, plan: Plan, arg_map: list[int], steps: int) -> PipelineRunner:
        fresh = self._runner(plan)
        fresh.rebalanced, fresh.measure_first = True, False  # once per signature: the new cuts are final
        fresh.steps = steps  # zb-auto re-plans at the same step as without the re-cut
        self.plans[key] = plan
        self._built[key] = (fresh, arg_map)
        return fresh

    def build_plan(self, args: Sequence[Any], training: bool, measured: tuple[float, ...] | None = None,
                   previous: tuple[int, ...] | None = None) -> tuple[Plan, list[int]]:
        """The plan for one call's inputs, and for each of the plan graph's inputs its position in `args`."""
        self.pipeline.schedule_for(training)  # impossible placements fail here, on every rank, before any work
        outer = [_with_requires_grad(s, a) for s, a in zip(self.inputs, args)]
        first = split_microbatches(outer, args, self.options.microbatches)[0]
        if self.static and self.options.microbatches == 1:
            gm, specs, example, arg_map = self.gm, outer, first, list(range(len(args)))
        else:
            if self.frame is None:
                raise ZbUnsupportedError("this graph was not captured by Dynamo, so zb cannot split its batch")
            gm, example, inner = self.frame.capture({s.index: first[s.index] for s in outer if s.kind == "input"})
            position = {s.source: s.index for s in outer}
            missing = [s.source for s in inner if s.source not in position]
            if missing:
                raise ZbUnsupportedError(f"re-tracing at microbatch size read inputs Dynamo did not: {missing}")
            arg_map = [position[s.source] for s in inner]
            specs = [_with_requires_grad(s, args[i]) for s, i in zip(inner, arg_map)]
        plan = Plan(
            graph=gm,
            inputs=specs,
            example_inputs=list(example),
            num_outputs=_num_outputs(gm),
            training=training,
            options=self.options,
            num_stages=self.pipeline.num_stages,
            measured_stage_times=measured,
            previous_cuts=previous,
        )
        return run_passes(plan, PASSES), arg_map

    def _runner(self, plan: Plan) -> PipelineRunner:
        pipeline = self.pipeline
        schedule = pipeline.schedule_for(plan.training)
        local = pipeline.local_ranks
        stages = {s for s, r in enumerate(schedule.placement) if r in local}
        compiled = compile_plan(plan, stages=stages)
        options = plan.options
        measure_first = plan.training and plan.num_stages > 1 and options.rebalance and not options.split_points
        return PipelineRunner(plan, compiled, schedule, local, pipeline.transport(), pipeline.group,
                              distributed=pipeline.distributed, measure_first=measure_first)


RECUT_GAIN = 0.05  # re-cut only if the slowest stage gets (by the measured costs) at least this much quicker


def _needs_rebalancing(runner: PipelineRunner) -> bool:
    times = runner.stage_times()
    options = runner.plan.options
    if runner.rebalanced or times is None or len(times) < 2 or options.split_points or not options.rebalance:
        return False
    return max(times) > REBALANCE_ABOVE * (sum(times) / len(times))


def _with_requires_grad(spec: InputSpec, value: Any) -> InputSpec:
    return replace(spec, requires_grad=isinstance(value, torch.Tensor) and value.requires_grad)


def _has_symbolic_shape(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    return value


def _num_outputs(gm: fx.GraphModule) -> int:
    (out,) = gm.graph.find_nodes(op="output")
    return len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1


def _source(gm: fx.GraphModule, index: int):
    return placeholders(gm)[index].meta["grapharg"].source


def _reject_graph_break(gm: fx.GraphModule):
    """Raise if Dynamo split the frame into several graphs; returns Dynamo's translator (None outside Dynamo)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:  # called outside Dynamo (a test handing us a graph directly)
        return None
    reason = getattr(tx.output, "compile_subgraph_reason", None)
    resumed = tx.f_code.co_name.startswith("torch_dynamo_resume_in_")
    if (reason is not None and reason.graph_break) or resumed:
        where = ""
        if reason is not None and reason.user_stack:
            frame = reason.user_stack[-1]
            where = f" at {frame.filename}:{frame.lineno} ({frame.line})"
        why = reason.reason.strip().splitlines()[0] if reason is not None and not resumed else "code after a break"
        raise ZbUnsupportedError(
            f"zb needs the whole model in one graph, but Dynamo broke the graph{where}: {why}\n"
            "Remove what Dynamo cannot trace there (prints, .item(), data-dependent Python control flow), and "
            "use torch.compile(..., fullgraph=True) to see every break."
        )
    return tx
