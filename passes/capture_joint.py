"""capture_joint: the Dynamo graph -> one joint forward/backward graph per stage (AOTAutograd).

Contract
  input:  `plan.graph` is a Dynamo graph whose placeholders are described by `plan.inputs` (parameters lifted to
          inputs); `plan.example_inputs` holds one microbatch. When training, output 0 is a scalar float loss.
  output: training  -> stage 0 gets `joint`: placeholders `in:<i>` (every graph input, in order) then
                       `tangent:0`; outputs `out:<j>` for each model output, then `grad:<i>` for each input
                       (None where the input gets no gradient). Aten-level, functional, Inductor decompositions.
          inference -> stage 0 gets `forward` directly (placeholders `in:<i>`, outputs `out:<j>`).
  Outputs other than the loss are detached before tracing: only the loss is differentiated, so the backward
  takes exactly one tangent.

    Dynamo:  fc_w, x, y -> (loss, logits)
    joint:   in:0, in:1, in:2, tangent:0 -> (out:0, out:1, grad:0, None, None)
"""

from __future__ import annotations

import contextlib

import torch
import torch._inductor.decomposition
from torch import fx
from torch._functorch._aot_autograd.descriptors import (
    GradAOTOutput,
    PlainAOTInput,
    PlainAOTOutput,
    TangentAOTInput,
)
from torch._functorch.aot_autograd import aot_export_joint_with_descriptors, aot_export_module
from zb.passes.plan import Plan, Stage

from zb.errors import ZbUnsupportedError


def capture_joint(plan: Plan) -> Plan:
    _check_outputs(plan)
    decompositions = torch._inductor.decomposition.select_decomp_table()
    module = _LossFirst(plan.graph)
    args = tuple(plan.example_inputs)
    if plan.training:
        with contextlib.ExitStack() as stack:
            joint = aot_export_joint_with_descriptors(stack, module, args, decompositions=decompositions)
        _reject_extra_state(joint.params_spec, joint.buffers_spec)
        gm = joint.graph_module
        _flatten_calling_convention(gm)
        _label_joint(gm, plan)
        stage = Stage(index=0, joint=gm)
        plan.counters["capture_joint.joint_nodes"] += _compute_nodes(gm)
    else:
        with torch.no_grad():
            gm, signature = aot_export_module(module, args, trace_joint=False, decompositions=decompositions)
        _reject_extra_state(signature.parameters, signature.buffers)
        for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
            node.meta["zb_key"] = f"in:{i}"
        gm.meta["zb_output_keys"] = [f"out:{j}" for j in range(plan.num_outputs)]
        stage = Stage(index=0, pieces={"forward": gm})
    for node in stage.graphs()[("joint" if plan.training else "forward")].graph.nodes:
        node.meta["zb_stage"] = 0
    plan.stages = [stage]
    return plan


class _LossFirst(torch.nn.Module):
    """Calls the Dynamo graph and detaches every output but the loss, so only the loss is differentiated."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        outs = self.gm(*args)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        rest = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs[1:])
        return (outs[0], *rest)


def _check_outputs(plan: Plan) -> None:
    if not plan.training:
        return
    (out,) = plan.graph.graph.find_nodes(op="output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    example = values[0].meta.get("example_value") if values and isinstance(values[0], fx.Node) else None
    if not (isinstance(example, torch.Tensor) and example.dim() == 0 and example.is_floating_point()):
        got = "nothing" if example is None else _describe(example)
        raise ZbUnsupportedError(
            "zb trains on a scalar loss, but the compiled function's first output is "
            f"{got}. Compile a function that returns the loss first, for example\n"
            "    step = torch.compile(lambda x, y: F.cross_entropy(model(x), y), backend='zb')\n"
            "or run it under torch.no_grad() for inference."
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _reject_extra_state(params, buffers) -> None:
    if params or buffers:
        raise ZbUnsupportedError(
            f"the captured graph holds state that was not lifted to an input ({list(params) + list(buffers)}); "
            "zb expects Dynamo to lift every parameter and buffer (torch._dynamo.config.inline_inbuilt_nn_modules)"
        )


def _flatten_calling_convention(gm: fx.GraphModule) -> None:
    # The export wraps inputs and outputs in pytrees; pieces here take and return flat tuples.
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()


def _label_joint(gm: fx.GraphModule, plan: Plan) -> None:
    for node in gm.graph.find_nodes(op="placeholder"):
        desc = node.meta.get("desc")
        if isinstance(desc, PlainAOTInput):
            node.meta["zb_key"] = f"in:{desc.idx}"
        elif isinstance(desc, TangentAOTInput) and isinstance(desc.output, PlainAOTOutput):
            node.meta["zb_key"] = f"tangent:{desc.output.idx}"
        else:
            raise ZbUnsupportedError(f"unexpected joint graph input {node.name} ({desc}); zb cannot run it")
    (out,) = gm.graph.find_nodes(op="output")
    keys = []
    for desc in out.meta["desc"]:
        if desc is None:
            keys.append(None)
        elif isinstance(desc, PlainAOTOutput):
            keys.append(f"out:{desc.idx}")
        elif isinstance(desc, GradAOTOutput) and isinstance(desc.grad_of, PlainAOTInput):
            keys.append(f"grad:{desc.grad_of.idx}")
        else:
            raise ZbUnsupportedError(
                f"the model's graph has an output zb cannot run yet: {desc}. In-place updates of buffers or "
                "inputs (for example BatchNorm running statistics in training mode) are not supported; use "
                "LayerNorm/GroupNorm or put the module in eval mode."
            )
    # Grads of inputs that need none are None already; an out:<j> for j > 0 is detached, so a grad is never None
    # by accident here.
    gm.meta["zb_output_keys"] = keys


def _compute_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")
