"""assign_updates: each stage's parameter update as one fused kernel, run right after the stage's last W.

Contract
  input:  every stage's pieces as split_backward leaves them (B or W outputs grad:in:<i> for the parameters
          the stage reads); `options.optimizer`, the user's optimizer (nothing happens without one).
  output: `plan.updates[s]`: the parameter indices whose gradient only stage s produces; the runtime updates
          them with one fused kernel (ops/optimizer.py) as soon as stage s has run its last W.
          `plan.shared_updates`: parameters several stages produce a gradient for (tied weights); they are
          updated once every stage's part of their gradient is summed, at the end of the step.
  Param groups zb cannot run (e.g. differentiable=True) are refused here, before anything runs.
"""

from __future__ import annotations

from zb.ops.optimizer import check_group
from zb.core.errors import ZbUnsupportedError
from zb.passes.plan import Plan


def assign_updates(plan: Plan) -> Plan:
    optimizer = plan.options.optimizer
    if optimizer is None or not plan.training:
        return plan
    for group in optimizer.param_groups:
        why = check_group(optimizer, group)
        if why:
            raise ZbUnsupportedError(f"zb cannot fuse this {type(optimizer).__name__} update: {why}")
    producers = {i: stages for i, stages in plan.grad_producers().items() if plan.inputs[i].kind == "parameter"}
    plan.updates = {s.index: [] for s in plan.stages}
    plan.shared_updates = []
    for index, stages in sorted(producers.items()):
        if len(stages) == 1:
            plan.updates[next(iter(stages))].append(index)
        else:
            plan.shared_updates.append(index)
    plan.counters["assign_updates.fused_updates"] = sum(1 for v in plan.updates.values() if v)
    plan.counters["assign_updates.parameters"] = len(producers)
    return plan
