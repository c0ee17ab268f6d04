"""The invariants every graph satisfies between passes (see passes/README.md), checked after each pass.

The runner calls `verify_plan` after every pass when ZB_VERIFY=1 and always in the test suite (tests/conftest.py
sets it); a violation raises `InvariantError` naming the pass, the stage, the graph and the node.
"""

from __future__ import annotations

import operator

from torch import fx

from zb.core import torch_internals
from zb.passes.keys import Key, Role
from zb.passes.plan import Plan, input_keys, output_keys, output_values

# Calls without a value: a grad-mode switch (torch.no_grad()), an item assignment (x[i] = v), a usage log.
_VALUELESS = (torch_internals.SET_GRAD_ENABLED, operator.setitem, torch_internals.LOG_API_USAGE_ONCE)


class InvariantError(AssertionError):
    """A graph broke one of the invariants passes/README.md lists."""


def verify_plan(plan: Plan) -> None:
    for stage in plan.stages:
        for name, gm in stage.graphs().items():
            try:
                verify_graph(gm, stage.index)
            except InvariantError as e:
                raise InvariantError(f"stage {stage.index} {name}: {e}") from None
    _verify_gradients_once(plan)


def verify_graph(gm: fx.GraphModule, stage_index: int) -> None:
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises RuntimeError for a malformed graph
        raise InvariantError(f"graph lint failed: {e}") from None
    keys = input_keys(gm) if all("zb_key" in n.meta for n in gm.graph.find_nodes(op="placeholder")) else None
    if keys is None:
        raise InvariantError("a placeholder has no meta['zb_key']")
    if not all(isinstance(k, Key) for k in keys):
        raise InvariantError(f"an input key is not a Key: {keys}")
    if len(set(keys)) != len(keys):
        raise InvariantError(f"duplicate input keys {keys}")
    outs = output_keys(gm)
    if not all(k is None or isinstance(k, Key) for k in outs):
        raise InvariantError(f"an output key is neither a Key nor None: {outs}")
    if len(outs) != len(output_values(gm)):
        raise InvariantError(f"{len(outs)} output keys for {len(output_values(gm))} outputs")
    for node in gm.graph.nodes:
        # Aten-level graphs carry meta["val"]; a stage's torch-level graph carries Dynamo's meta["example_value"].
        if node.op in ("placeholder", "call_function") and "val" not in node.meta and "example_value" not in node.meta \
                and node.target not in _VALUELESS \
                and getattr(node.target, "name", lambda: "")() not in ("run_with_rng_state", "run_and_save_rng_state"):
            # _VALUELESS calls return nothing, and the partitioner's replay of a recomputed random op (activation
            # checkpointing) comes without a value
            raise InvariantError(f"node {node.name} has no meta['val']")
        if node.op == "call_function":
            if node.meta.get("zb_stage") != stage_index:
                raise InvariantError(f"node {node.name} is tagged zb_stage={node.meta.get('zb_stage')}")
            schema = torch_internals.op_schema(node.target)
            if schema is not None and schema.is_mutable:
                raise InvariantError(f"node {node.name} mutates its input ({node.target})")


def _verify_gradients_once(plan: Plan) -> None:
    """Every parameter gradient comes from W, once per stage that reads it; B produces none; W no input
    gradient."""
    params = {s.key.grad() for s in plan.parameters}
    for stage in plan.stages:
        b, w = stage.backward_input, stage.backward_weight
        if b is not None and params & set(output_keys(b)):
            raise InvariantError(f"stage {stage.index} B produces parameter gradients")
        if w is not None:
            grads = [k for k in output_keys(w) if k is not None and k.role is Role.GRAD]
            if set(grads) - params:
                raise InvariantError(f"stage {stage.index} W produces input gradients {set(grads) - params}")
            if len(grads) != len(set(grads)):
                raise InvariantError(f"stage {stage.index} W produces a parameter gradient twice: "
                                     f"{sorted(grads, key=str)}")
