"""precision_policy: options param_dtype / reduce_dtype (torchtitan's MixedPrecisionPolicy) on the graph.

Contract
  input:  `plan.graph` (after autocast_regions), `plan.inputs`; `plan.options.param_dtype` (None: nothing to do).
  output: `plan.graph` a copy in which every float32 parameter placeholder stands for its `param_dtype` copy (its
          example value has that dtype), every floating-point input (batched or not) is cast to `param_dtype` by a
          node right after its placeholder, and every example value downstream is recomputed for the new dtypes;
          `plan.copies` = {input index: param_dtype} for the parameters the runtime copies.

The copies are not graph nodes: the runtime makes each once per step, before the first piece that reads it, for the
stages of its rank, and frees it after the last of them (runtime/executor.py), so no microbatch makes or saves its
own. W's gradient of a copy comes out in `param_dtype`; the runtime sums it over the microbatches (and the
replicas) in `reduce_dtype`, and the parameter's `.grad` and the fused update are float32. Eager's counterpart:
a bfloat16 copy of the model's parameters (buffers keep their dtype, as with FSDP2) run per microbatch, its
gradients added up in float32 (tests/test_precision.py). A parameter several stages read gets each stage's
gradient summed in float32, where eager's one bfloat16 copy adds the uses in bfloat16 (a bf16 rounding apart).

    in:0 (w, float32)  ->  in:0 (w's bfloat16 copy);   x (float32 input) -> x.to(bfloat16)
"""

from __future__ import annotations

import functools

import torch
from torch import fx

from zb.core.errors import ZbUnsupportedError
from zb.passes.autocast_regions import KEY as AUTOCAST
from zb.passes.plan import Plan, copy_module, run_fake


def precision_policy(plan: Plan) -> Plan:
    dtype = plan.options.param_dtype
    if dtype is None:
        return plan
    gm = copy_module(plan.graph)
    placeholders = gm.graph.find_nodes(op="placeholder")
    copies = {}
    for spec, node in zip(plan.inputs, placeholders):
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if spec.kind == "parameter":
            if value.dtype != torch.float32:
                raise ZbUnsupportedError(
                    f"option param_dtype={dtype} keeps float32 master parameters and computes with copies, but "
                    f"parameter {spec.name!r} is {value.dtype}: keep the model in float32 with param_dtype, or drop "
                    "param_dtype for a model cast to low precision")
            copies[spec.index] = dtype
            node.meta["example_value"] = run_fake(functools.partial(value.to, dtype), value)
            real = plan.example_inputs[spec.index]  # the stages are traced with a tensor like the copy instead
            plan.traced_inputs[spec.index] = torch.empty_strided(
                real.shape, real.stride(), dtype=dtype, device=real.device).requires_grad_(real.requires_grad)
        elif spec.kind == "input" and value.dtype != dtype:  # every float argument, as FSDP2 casts forward inputs
            users = list(node.users)
            with gm.graph.inserting_after(node):
                cast = gm.graph.call_method("to", (node, dtype))
            for user in users:
                user.replace_input_with(node, cast)
    _propagate(gm)
    gm.recompile()
    plan.graph = gm
    plan.copies = copies
    plan.counters["precision_policy.copies"] = len(copies)
    return plan


def _propagate(gm: fx.GraphModule) -> None:
    """Recompute every node's example value from its inputs' (under the node's autocast, if any)."""
    import contextlib

    def value(a):
        if isinstance(a, fx.Node) and a.op == "get_attr":  # a subgraph body (activation checkpointing)
            return getattr(gm, a.target)
        return a.meta.get("example_value") if isinstance(a, fx.Node) else a

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)

        def run(*_, node=node, args=args, kwargs=kwargs):
            with contextlib.ExitStack() as stack:
                for device, dtype in node.meta.get(AUTOCAST, ()):
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return gm.get_submodule(node.target)(*args, **kwargs)
                return node.target(*args, **kwargs)

        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        node.meta["example_value"] = run_fake(run, *tensors)
