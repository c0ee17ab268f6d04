"""record_boundaries: what crosses each stage boundary, with the shapes and dtypes known statically.

Contract
  input:  every stage's pieces as split_backward leaves them (forward reads act:<name> from the stage before;
          B or W reads tangent:act:<name> for activations the stage sent on).
  output: `stage.receives_forward`: the (act key, shape, dtype) a stage's F receives from the stage before, in
          the order they are sent; `stage.receives_backward`: the (act key, shape, dtype) whose gradients its
          backward receives from the stage after (a gradient the next stage does not produce is sent as zeros).
  The runtime allocates its receive buffers from these lists before a step starts and checks every tensor it
  receives against them; the schedule's lowering (zb.schedules.lower) decides when each transfer happens.

    stage 0: F -> act:h [2, 16, 32] f32           stage 1: receives_forward  = [act:h [2, 16, 32] f32]
    stage 0: receives_backward = [act:h ...]      stage 1: B -> grad:act:h
"""

from __future__ import annotations

from zb.passes.keys import Kind, Role
from zb.passes.plan import Plan, output_keys


def record_boundaries(plan: Plan) -> Plan:
    for stage in plan.stages:
        forward = stage.forward
        stage.receives_forward = [
            (n.meta["zb_key"], tuple(n.meta["val"].shape), n.meta["val"].dtype)
            for n in forward.graph.find_nodes(op="placeholder") if n.meta["zb_key"].is_(Kind.ACT)
        ]
        tangents = {}
        for gm in (stage.backward_input, stage.backward_weight) if plan.training else ():
            for n in (gm.graph.find_nodes(op="placeholder") if gm is not None else []):
                if n.meta["zb_key"].is_(Kind.ACT, Role.TANGENT):
                    tangents[n.meta["zb_key"].value()] = (tuple(n.meta["val"].shape), n.meta["val"].dtype)
        stage.receives_backward = [(k, *tangents[k]) for k in output_keys(forward) if k in tangents]
        plan.counters["record_boundaries.transfers"] += len(stage.receives_forward) + len(stage.receives_backward)
    return plan
