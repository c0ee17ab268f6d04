"""partition_fw_bw: each stage's joint graph -> a forward piece and one (unsplit) backward graph.

Contract
  input:  `stage.joint` as capture_joint leaves it (placeholders in:/act:, tangent:<key>; outputs out:/act:,
          then grad:<key>).
  output: `stage.forward`: the stage's inputs -> its outputs, then saved:<name> for each activation the
          backward needs. `stage.backward`: placeholders saved:<name> and tangent:<key>; outputs grad:<key>.
  Which activations are saved and which are recomputed is decided by the same min-cut rematerialisation
  partitioner Inductor uses, so `compiler="eager"` and `compiler="inductor"` run the same graphs.

    joint:    in:0, in:1, tangent:out:0 -> out:0, grad:in:0, grad:in:1
    forward:  in:0, in:1                -> out:0, saved:addmm, saved:primals_2
    backward: saved:addmm, saved:primals_2, tangent:out:0 -> grad:in:0, grad:in:1
"""

from __future__ import annotations

from torch import fx

from zb.core import torch_internals
from zb.passes.keys import Kind, PieceName, Role, saved_key
from zb.passes.plan import Plan, output_keys


def partition_fw_bw(plan: Plan) -> Plan:
    for stage in plan.stages:
        if stage.joint is None:
            continue
        keys = output_keys(stage.joint)
        num_fwd = sum(1 for k in keys if k is not None and k.role is Role.VALUE and k.kind in (Kind.OUT, Kind.ACT))
        # The partitioner recognises primals and tangents by placeholder name, which the export guarantees. It
        # makes fake RNG states when a recomputed region (activation checkpointing) draws random numbers, in the
        # fake mode the joint's values were traced in.
        values = [n.meta.get("val") for n in stage.joint.graph.find_nodes(op="placeholder")]
        fake_mode = torch_internals.detect_fake_mode(values)
        forward, backward = torch_internals.partition_joint(stage.joint, num_fwd, fake_mode)
        _label(forward, backward, stage, keys[:num_fwd], keys[num_fwd:])
        stage.pieces[PieceName.FORWARD] = forward
        stage.backward = backward
        plan.counters["partition_fw_bw.saved_values"] += len(output_keys(forward)) - num_fwd
    return plan


def _label(forward: fx.GraphModule, backward: fx.GraphModule, stage, fwd_keys, grad_keys) -> None:
    by_name = {n.name: n.meta["zb_key"] for n in stage.joint.graph.find_nodes(op="placeholder")}
    for node in forward.graph.find_nodes(op="placeholder"):
        node.meta["zb_key"] = by_name[node.name]
    (fw_out,) = forward.graph.find_nodes(op="output")
    saved = fw_out.args[0][len(fwd_keys):]
    forward.meta["zb_output_keys"] = list(fwd_keys) + [saved_key(n.name) for n in saved]
    # A saved value's placeholder in the backward is named after it, but not always (the RNG state of a recomputed
    # random op arrives as rng_state_output_<k>), and the order differs where sizes are symbolic (the backward
    # takes the saved sizes first, the forward returns them last): matched by name, the others by position.
    inputs = backward.graph.find_nodes(op="placeholder")
    received = [n for n in inputs if getattr(by_name.get(n.name), "role", None) is not Role.TANGENT]
    if len(received) != len(saved):
        raise AssertionError(f"stage {stage.index}: the backward takes {len(received)} saved values, the forward "
                             f"returns {len(saved)}")
    saved_names = {value.name for value in saved}
    received_names = {node.name for node in received}
    for node in received:
        if node.name in saved_names:
            node.meta["zb_key"] = saved_key(node.name)
    rest = [node for node in received if node.name not in saved_names]
    for node, value in zip(rest, [value for value in saved if value.name not in received_names]):
        node.meta["zb_key"] = saved_key(value.name)
    for node in inputs:
        node.meta.setdefault("zb_key", by_name.get(node.name))
    backward.meta["zb_output_keys"] = list(grad_keys)
    for gm in (forward, backward):
        for node in gm.graph.nodes:
            node.meta.setdefault("zb_stage", stage.index)
