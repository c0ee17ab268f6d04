"""Adapting a pipeline to what it measures: zb-auto's re-plan, re-cutting the stages, and moving parameters.

Every threshold of these decisions lives here. Each decision is taken on pipeline rank 0 and broadcast through
the communication module, so every rank acts alike by construction (the measurements are gathered from every
rank first; see runtime/profiler.py `StepProfiler.collect`).

* **Re-plan** (zb-auto): the step `REPLAN_AFTER` is profiled (the first warms caches up); rank 0 plans zb-auto
  with the measured costs and every rank installs that schedule. The stages and their placement stay.
* **Re-cut** (option `rebalance`): the first training step is measured, each piece run `MEASURE_REPEAT` times
  (the quickest counts). When the slowest stage is over `REBALANCE_ABOVE` x the mean, the passes cut the model
  again with each old stage's estimates scaled to its measurement (allowing only `MEASURED_BALANCE_WINDOW` of
  the total cost for a cheaper crossing), and the new cut is taken if it makes the slowest stage at least
  `RECUT_GAIN` quicker by those costs. In one process the plan is simply rebuilt. Across processes this happens
  at the end of the first call, before `loss.backward()` hands out gradients: every rank rebuilds the plan,
  compiles what it now owns, and `migrate` moves the parameters and buffers that change rank with that step's
  gradients (no optimizer state exists yet). With `options["optimizer"]` across processes the update already
  ran on the old owners, so the stages stay and rank 0 logs the `split_points` that would balance them.

    old: stage 0 on rank 0 reads w0, w1; stage 1 on rank 1 reads w2
    new: stage 0 reads w0;               stage 1 reads w1, w2
    moves: w1 (value and gradient) rank 0 -> rank 1; rank 0's backward no longer returns w1's gradient

The compiled graph whose pipeline changes comes in as an argument (`Graph`: what this module reads and calls of it;
zb/backend.py `CompiledGraph` is one), so this module does not import the backend that calls it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from zb.codegen.program import Program
from zb.core.errors import ZbError
from zb.passes import Plan, partition_stages
from zb.passes.partition_stages import split_points_for
from zb.plan_cache import PlanCache
from zb.runtime import PipelineRunner
from zb.runtime.released import is_released, restore
from zb.schedules import replan

log = logging.getLogger(__name__)

REPLAN_AFTER = 2  # zb-auto re-plans with the costs measured in this step (the first one warms caches up)
MEASURE_REPEAT = 3  # in the first step measured for re-cutting, each piece runs this often; the quickest counts
REBALANCE_ABOVE = 1.15  # re-cut when the slowest measured stage is this much over the mean
RECUT_GAIN = 0.05  # ... and only if the slowest stage gets (by the measured costs) at least this much quicker
MEASURED_BALANCE_WINDOW = 0.01  # a re-cut may trade this fraction of the total cost for a cheaper crossing
MIGRATE = 16  # control message kinds from here on: one per message of a migration


class Graph(Protocol):
    """What this module needs of the compiled graph whose pipeline it changes: its pipelines, a plan built again."""

    cache: PlanCache  # the pipelines by input signature (their plans, re-cut decisions, symbolic dims)

    @property
    def built(self) -> dict[tuple, tuple[PipelineRunner | None, list[int]]]:
        """Signature -> (what runs it, the position in the graph's arguments of each of the plan's inputs)."""

    def build_plan(self, args: Sequence[Any], training: bool, measured: tuple[float, ...] | None = None,
                   previous: tuple[int, ...] | None = None, balance_window: float | None = None,
                   keep_cuts: tuple | None = None, dynamic: dict[int, list[int]] | None = None
                   ) -> tuple[Plan, list[int]]:
        """The plan for one call's inputs, and for each of its inputs its position in `args`."""

    def install(self, key: tuple, plan: Plan, arg_map: list[int], steps: int) -> PipelineRunner:
        """Run `plan` for signature `key` from now on; returns its runner."""

    def may_recut(self) -> bool:
        """Whether a re-cut may still happen (option release: once per model)."""

    def recut_done(self, runner: PipelineRunner, values: list[Any], plan: Plan) -> None:
        """After a re-cut across ranks: free what this rank gave away (option release)."""


def configure(runner: PipelineRunner, *, measure_first: bool) -> PipelineRunner:
    """Which steps of a fresh runner are profiled (and measured with repeats) for the decisions below."""
    if runner.program.training and runner.schedule.name == "zb-auto":
        runner.profile_steps.add(REPLAN_AFTER)
    if measure_first:
        runner.profile_steps.add(1)
        runner.repeat[1] = MEASURE_REPEAT
    return runner


def after_step(graph: Graph, key: tuple, runner: PipelineRunner, args: Sequence[Any]) -> PipelineRunner:
    """What to change after a step; returns the runner for the next step (the same, or a re-cut one)."""
    if runner.program.training and runner.schedule.name == "zb-auto" and runner.steps == REPLAN_AFTER:
        runner.install(_replanned(runner))
    if key in graph.cache.rebalanced or not runner.program.options.rebalance or runner.stage_times() is None \
            or not graph.may_recut():
        return runner
    graph.cache.rebalanced.add(key)  # decided once per input signature, on the first measured step
    if runner.distributed and runner.optimizer is not None:
        if needs_rebalancing(runner):
            _suggest_split_points(graph.cache.entries[key].plan, runner)
        return runner
    recut = _recut(graph, key, runner, args)
    if recut is None:
        return runner
    if not runner.distributed:  # one process: every parameter and its optimizer state stay put
        return graph.install(key, *recut, steps=runner.steps)
    return _rebalance_across_ranks(graph, key, runner, args, *recut)


def needs_rebalancing(runner: PipelineRunner) -> bool:
    times = runner.stage_times()
    options = runner.program.options
    if not options.rebalance or options.split_points or times is None or len(times) < 2:
        return False
    return max(times) > REBALANCE_ABOVE * (sum(times) / len(times))


def _replanned(runner: PipelineRunner):
    """zb-auto for the measured costs, on the same stages and placement (one stage per rank, V or interleaved),
    planned on rank 0 and broadcast."""
    schedule = None
    if runner.ranks[0] == 0:
        schedule = replan(runner.schedule, runner.costs, runner.program.options.memory_limit)
    return _agree(runner, schedule, "sharing rank 0's re-planned schedule")


def _agree(runner: PipelineRunner, value: Any, what: str) -> Any:
    """Pipeline rank 0's `value` on every rank; with data-parallel replicas, replica 0's, so that every replica
    runs the same schedule (their gradient sums must come in the same order)."""
    value = runner.comm.broadcast_object(value, 0, what)
    if runner.replica_comm is not None:
        value = runner.replica_comm.broadcast_object(value, 0, what + " across the replicas")
    return value


def _recut(graph: Graph, key: tuple, runner: PipelineRunner, args: Sequence[Any]):
    """The plan re-cut on the runner's measured stage times, or None. Rank 0 decides (the stages are uneven, and
    the new cut makes the slowest stage at least RECUT_GAIN quicker as the measured costs predict) and broadcasts
    the decision with the times it used, so that every rank builds the same plan."""
    old = graph.cache.entries[key].plan
    decision = None
    if runner.ranks[0] == 0 and needs_rebalancing(runner):
        measured = runner.stage_times()
        plan, arg_map = _build(graph, key, args, old, measured)
        predicted = max(plan.stage_costs, default=max(measured))
        times = [round(t * 1e3, 2) for t in measured]
        if plan.cuts == old.cuts or predicted > (1 - RECUT_GAIN) * max(measured):
            log.info("zb: measured stage times %s ms; no other cut makes the slowest stage %g%% quicker, the "
                     "stages stay", times, RECUT_GAIN * 100)
        else:
            log.info("zb: re-cut the stages on measured times %s ms: %s -> %s (slowest stage %.2f -> %.2f ms "
                     "predicted)", times, split_points_for(old) or list(old.cuts),
                     split_points_for(plan) or list(plan.cuts), max(measured) * 1e3, predicted * 1e3)
            decision = (measured, plan.cuts)
    decision = _agree(runner, decision, "sharing rank 0's re-cut decision")
    if decision is None:
        return None
    if runner.ranks[0] != 0:
        plan, arg_map = _build(graph, key, args, old, decision[0])
    if plan.cuts != decision[1]:
        raise ZbError(f"rank {runner.ranks[0]} re-cut the model at {plan.cuts} but rank 0 at {decision[1]}: the "
                      "ranks traced different graphs")
    return plan, arg_map


def _build(graph: Graph, key: tuple, args: Sequence[Any], old: Plan, measured: Sequence[float]):
    """The plan re-cut on `measured` times, traced as the signature's plan was (its symbolic dims too)."""
    return graph.build_plan(args, old.training, measured=tuple(measured), previous=old.cuts,
                            balance_window=MEASURED_BALANCE_WINDOW, dynamic=graph.cache.entries[key].dynamic)


def _suggest_split_points(old: Plan, runner: PipelineRunner) -> None:
    """With options["optimizer"] across processes the stages stay where they are (the fused update already
    ran on the old owners). Say once which split_points the measured times call for."""
    probe = replace(old, measured_stage_times=runner.stage_times(), previous_cuts=old.cuts, stages=[],
                    balance_window=MEASURED_BALANCE_WINDOW)
    partition_stages(probe)
    suggestion = split_points_for(probe)
    if runner.ranks[0] == 0 and suggestion:
        log.warning("zb: measured stage times %s ms are unbalanced; to re-cut, start again with "
                    "options={'split_points': %s}", [round(t * 1e3, 2) for t in runner.stage_times()], suggestion)


def _rebalance_across_ranks(graph: Graph, key: tuple, runner: PipelineRunner, args: Sequence[Any],
                            plan: Plan, arg_map: list[int]) -> PipelineRunner:
    """Run the re-cut `plan` and move the parameters whose stage changes rank, with this step's gradients."""
    old_plan = graph.cache.entries[key].plan
    if arg_map != graph.built[key][1] or [(s.kind, s.name) for s in plan.inputs] != \
            [(s.kind, s.name) for s in old_plan.inputs]:
        log.warning("zb: re-tracing for the re-cut gave different inputs; the stages stay where they are")
        return runner
    fresh = graph.install(key, plan, arg_map, steps=runner.steps)
    values = [args[i] for i in arg_map]
    planned = moves(runner.program, runner.schedule.placement, fresh.program, fresh.schedule.placement)
    migrate(planned, runner.ranks[0], runner.comm, values, runner.last_grads, runner.program,
            runner.schedule.placement, fresh.program, fresh.schedule.placement)
    if runner.ranks[0] == 0:
        log.info("zb: %d parameters and buffers moved to their new rank", len({m.index for m in planned}))
    graph.recut_done(fresh, values, plan)  # option release: what this rank gave away is freed here
    return fresh


@dataclass(frozen=True)
class Move:
    """One parameter or buffer that travels to a rank whose stages read it after a re-cut."""

    index: int  # the plan input (parameter or buffer)
    src: int  # pipeline rank that holds its value
    dst: int  # pipeline rank that reads it from now on
    with_grad: bool  # the gradient of the step just run travels too


def moves(old: Program, old_placement: Sequence[int], new: Program, new_placement: Sequence[int]) -> list[Move]:
    """What must travel for `new` to run where `old` ran; the same list on every rank."""
    before, after = old.readers(old_placement), new.readers(new_placement)
    result = []
    for index, spec in enumerate(old.inputs):
        if spec.kind not in ("parameter", "buffer") or not before.get(index):
            continue
        src = min(before[index])
        for dst in sorted(after.get(index, set()) - before[index]):
            result.append(Move(index, src, dst, index in old.grad_producers))
    return result


def migrate(planned: list[Move], rank: int, comm, values: Sequence[torch.Tensor], grads: list[torch.Tensor | None],
            old: Program, old_placement: Sequence[int], new: Program, new_placement: Sequence[int]) -> None:
    """Carry out `planned` on pipeline rank `rank`: send what it owns, receive what it gains (values copied into
    `values`, gradients put into `grads`), and drop the gradients of parameters it no longer reads. Per (sender,
    receiver) pair and dtype the tensors travel as one flat control message."""
    messages: dict[tuple[int, int, torch.dtype], list[tuple[Move, str]]] = defaultdict(list)
    for move in planned:
        dtype = old.input_specs[move.index].dtype
        messages[(move.src, move.dst, dtype)].append((move, "value"))
        if move.with_grad:
            messages[(move.src, move.dst, dtype)].append((move, "grad"))
    sends, posted = [], []
    for number, ((src, dst, dtype), parts) in enumerate(sorted(messages.items(), key=lambda kv: kv[0][:2])):
        if src == rank:
            flat = torch.cat([_part(move, what, values, grads).detach().reshape(-1) for move, what in parts])
            sends.append((comm.send_control(MIGRATE + number, flat, dst), dst))
        elif dst == rank:
            numel = sum(values[move.index].numel() for move, _ in parts)
            posted.append((comm.recv_control(MIGRATE + number, (numel,), dtype, src), parts, src))
    for (flat, handle), parts, src in posted:
        comm.wait(handle, f"receiving moved parameters from rank {src}")
        offset = 0
        for move, what in parts:
            target = values[move.index]
            piece = flat[offset: offset + target.numel()].view(target.shape).to(target.device)
            offset += target.numel()
            if what == "value":
                if is_released(target):  # (option release: this rank did not hold it until now)
                    restore(target)
                with torch.no_grad():
                    target.copy_(piece)
            else:
                grads[move.index] = piece.clone()
    for handle, dst in sends:
        comm.wait(handle, f"sending moved parameters to rank {dst}")
    before, after = old.readers(old_placement), new.readers(new_placement)
    for index in before:
        if rank in before[index] and rank not in after.get(index, set()):
            grads[index] = None


def _part(move: Move, what: str, values, grads) -> torch.Tensor:
    if what == "value":
        return values[move.index]
    grad = grads[move.index]
    return grad if grad is not None else torch.zeros_like(values[move.index])
