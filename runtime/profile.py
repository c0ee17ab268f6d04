"""What a step really did: memory the plan implies per stage, measured costs, and the measured timeline.

`modelled_costs` gives the simulator the plan's activation bytes (M_B: what F leaves for the backward; M_W:
what B leaves for W) with unit times; `measured_costs` replaces the times by the median measured F, B, W time
of each stage and the shortest receive (a transfer whose data was already on its way); `measured_timeline`
turns the executor's trace into a `Timeline` that draws like a simulated one.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch

from zb.passes.plan import Plan, output_keys
from zb.schedules import BW, COMPUTE, Action, B, Costs, F, Schedule, Timeline, W


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def stage_memory(plan: Plan, held_keys: dict[int, set[str]]) -> tuple[list[float], list[float]]:
    """(M_B, M_W) per stage in bytes: what F leaves for the backward, and what B leaves for W."""
    mem_b, mem_w = [], []
    for stage in plan.stages:
        held = held_keys[stage.index]
        (out,) = stage.forward.graph.find_nodes(op="output")
        mem_b.append(float(sum(_nbytes(node.meta.get("val")) for key, node in zip(output_keys(stage.forward),
                                                                                   out.args[0]) if key in held)))
        w = stage.backward_weight
        reads = w.graph.find_nodes(op="placeholder") if w is not None else []
        mem_w.append(float(sum(_nbytes(n.meta.get("val")) for n in reads if n.meta["zb_key"] in held)))
    return mem_b, mem_w


def modelled_costs(plan: Plan, held_keys: dict[int, set[str]], comm: float = 0.0) -> Costs:
    mem_b, mem_w = stage_memory(plan, held_keys)
    n = plan.num_stages
    return Costs((1.0,) * n, (1.0,) * n, (1.0,) * n, comm, tuple(mem_b), tuple(min(w, b) for w, b in zip(mem_w, mem_b)))


def measured_costs(trace, plan: Plan, held_keys: dict[int, set[str]], statistic=statistics.median) -> Costs:
    """F, B, W seconds per stage (the median over microbatches, or `statistic`) from (rank, action, start, end)
    records of all ranks."""
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    receives = []
    for _, text, start, end in trace:
        action = Action.parse(text)
        if action.kind in COMPUTE:
            times[(action.stage, action.kind)].append(end - start)
        elif action.kind.startswith("RECV"):
            receives.append(end - start)
    n = plan.num_stages

    def median(stage: int, kind: str) -> float:
        values = times.get((stage, kind))
        if values:
            return statistic(values)
        if kind in (B, W) and times.get((stage, BW)):  # unsplit backward measured: split it 2:1 as the paper does
            return statistic(times[(stage, BW)]) * (2 / 3 if kind == B else 1 / 3)
        return 1e-6

    mem_b, mem_w = stage_memory(plan, held_keys)
    return Costs(tuple(median(s, F) for s in range(n)), tuple(median(s, B) for s in range(n)),
                 tuple(median(s, W) for s in range(n)), min(receives) if receives else 0.0,
                 tuple(mem_b), tuple(min(w, b) for w, b in zip(mem_w, mem_b)))


def measured_timeline(trace, schedule: Schedule, costs: Costs) -> Timeline:
    """The compute actions of a trace as a Timeline (times from the first action of the step)."""
    origin = min(start for _, _, start, _ in trace)
    timeline = Timeline(schedule, costs)
    for _, text, start, end in trace:
        action = Action.parse(text)
        if action.kind in COMPUTE:
            timeline.start[action] = start - origin
            timeline.end[action] = end - origin
    return timeline
