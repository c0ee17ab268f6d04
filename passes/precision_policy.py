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

from zb.core import torch_internals
from zb.core.errors import ZbUnsupportedError
from zb.passes.autocast_regions import KEY as AUTOCAST
from zb.passes.plan import Plan, copy_module, run_fake


def precision_policy(plan: Plan) -> Plan:
    dtype = plan.options.param_dtype
    if dtype is None:
        return plan
    _refuse_traced_dtypes(plan.graph, dtype)
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


_FINFO = {float(getattr(torch.finfo(torch.float32), k)) for k in ("min", "max", "eps", "tiny", "resolution")}


def _refuse_traced_dtypes(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Dynamo traced the model with float32 parameters, so code that picks a dtype from a tensor (`x.to(w.dtype)`,
    `torch.zeros(..., dtype=x.dtype)`, `softmax(..., dtype=x.dtype)`, `torch.finfo(x.dtype).min`: Hugging Face's
    RMSNorm, rotary embedding and masks) left float32 written into the graph where eager's bfloat16 copy of the
    model would have read bfloat16. In the graph such a read looks like a written float32: every float32 given as a
    dtype (a cast to it, a dtype= argument of any operation) and float32's finfo values are refused, in checkpointed
    bodies too, since zb cannot tell which it was. `x.float()` names its dtype and stays allowed. What the graph
    cannot show is not caught: a Python branch on a dtype, or arithmetic on finfo values that Dynamo folded into
    another constant (README, Precision)."""
    found = []
    bodies = [gm]
    while bodies:
        graph = bodies.pop()
        for node in graph.graph.nodes:
            if node.op == "get_attr" and isinstance(getattr(graph, node.target, None), fx.GraphModule):
                bodies.append(getattr(graph, node.target))
            if node.op not in ("call_function", "call_method"):
                continue
            values = (*node.args, *node.kwargs.values())
            if any(isinstance(a, torch.dtype) and a == torch.float32 for a in values):
                found.append((node, "is given dtype torch.float32, as `x.dtype` of a float32 tensor would be"))
            elif any(isinstance(a, float) and a in _FINFO for a in values):
                found.append((node, "uses a float32 limit (torch.finfo(torch.float32)), as torch.finfo(x.dtype) of "
                                    "a float32 tensor does"))
    if found:
        where = "; ".join(f"{node.name} {why}{_line(node)}" for node, why in found[:3])
        raise ZbUnsupportedError(
            f"option param_dtype={dtype}: the traced graph has float32 written where the model's code may have read "
            f"a tensor's dtype ({len(found)} place{'s' if len(found) > 1 else ''}: {where}). Dynamo traced it with "
            f"float32 parameters, and eager with {dtype} copies of them would have chosen {dtype} there, so zb cannot "
            "run eager's program. Use torch.autocast instead (Hugging Face models are tested under it), or write "
            "`x.float()` for a float32 you mean and no dtype where you mean the tensor's")


def _line(node: fx.Node) -> str:
    """Where the user's code made `node`: its stack trace's last frame and source line."""
    trace = [t.strip() for t in (node.meta.get("stack_trace") or "").splitlines()]
    trace = [t for t in trace if t and set(t) - set("^~ ")]  # (not 3.11's underlines)
    return f" ({trace[-2]}: {trace[-1]})" if len(trace) >= 2 else ""


def _propagate(gm: fx.GraphModule) -> None:
    """Recompute every node's example value from its inputs' (under the node's autocast, if any)."""
    import contextlib

    placeholders = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    mode = torch_internals.detect_fake_mode([v for v in placeholders if isinstance(v, torch.Tensor)])

    def value(a):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            attribute = getattr(gm, a.target)  # a subgraph body (activation checkpointing), or a tensor constant
            if isinstance(attribute, torch.Tensor) and mode is not None and "example_value" not in a.meta:
                return mode.from_tensor(attribute, static_shapes=True)
            return a.meta.get("example_value", attribute)
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

        node.meta["example_value"] = run_fake(run, mode=mode)  # (torch.arange(T) reads no tensor)
