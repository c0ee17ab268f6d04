"""capture_joint: each stage's torch-level graph -> its joint forward/backward graph (AOTAutograd).

Contract
  input:  `stage.graph` as partition_stages leaves it (placeholders in:<i> / act:<name>, outputs act:<name> /
          out:<j>) and `stage.example_inputs` (one microbatch). When training, the plan's output 0 is a scalar
          float loss, computed by the last stage.
  output: training  -> `stage.joint`: the stage's inputs, then tangent:<key> for every differentiable output;
                       outputs: the stage's outputs, then grad:<key> for each input (None where it gets none).
                       Aten-level, functional, Inductor's decompositions.
          inference -> `stage.forward` directly (the stage's inputs -> its outputs).
  On the last stage, outputs other than the loss are detached before tracing: only the loss is differentiated.
  A differentiable output that aliases a stage input or another output (a view of the stage's input, `h` and `h.T`
  both sent on) is cloned before tracing, so every output gets a tangent of its own (see `_independent`).

    stage graph: in:0 (w), act:h          -> act:y
    joint:       in:0, act:h, tangent:act:y -> act:y, grad:in:0, grad:act:h
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.fx as fx

from zb.core import torch_internals
from zb.core.errors import ZbUnsupportedError
from zb.passes.autocast_regions import KEY
from zb.passes.keys import Key, PieceName
from zb.passes.plan import Plan, input_keys, output_keys


def capture_joint(plan: Plan) -> Plan:
    _check_outputs(plan)
    decompositions = torch_internals.inductor_decompositions()
    last = len(plan.stages) - 1
    for stage in plan.stages:
        module = _LossFirst(stage.graph) if stage.index == last else _AsTuple(stage.graph)
        args = tuple(stage.example_inputs)
        keys_in, keys_out = input_keys(stage.graph), output_keys(stage.graph)
        if plan.training:
            with contextlib.ExitStack() as stack:
                # zb's triton_op operators (flash attention) stay single nodes, so the B/W split and the dumps see
                # one call and its backward; codegen hands them to Inductor as such.
                stack.enter_context(torch_internals.custom_triton_ops_opaque())
                joint = torch_internals.export_joint(stack, module, args, decompositions)
            _reject_extra_state(joint.params_spec, joint.buffers_spec)
            gm = joint.graph_module
            gm.graph.set_codegen(fx.graph.CodeGen())  # flat inputs and outputs, no pytrees
            gm.recompile()
            _label_joint(gm, keys_in, keys_out)
            stage.joint = gm
            plan.counters["capture_joint.joint_nodes"] += sum(n.op == "call_function" for n in gm.graph.nodes)
        else:
            with torch.no_grad(), torch_internals.custom_triton_ops_opaque():
                gm, signature = torch_internals.export_forward(module, args, decompositions)
            _reject_extra_state(signature.parameters, signature.buffers)
            for key, node in zip(keys_in, gm.graph.find_nodes(op="placeholder")):
                node.meta["zb_key"] = key
            gm.meta["zb_output_keys"] = list(keys_out)
            stage.pieces[PieceName.FORWARD] = gm
        for node in gm.graph.nodes:
            node.meta["zb_stage"] = stage.index
    return plan


class _AsTuple(torch.nn.Module):
    """Calls the stage graph; every output is differentiated, each as a tensor of its own (`_independent`)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def _outputs(self, args) -> tuple:
        annotated = any(KEY in node.meta for node in self.gm.graph.nodes)
        outs = _Autocasting(self.gm).run(*args) if annotated else self.gm(*args)
        return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)

    def forward(self, *args):
        outs = self._outputs(args)
        return _independent(outs, args, range(len(outs)))


class _Autocasting(fx.Interpreter):
    """Runs each operation annotated by autocast_regions inside `torch.autocast` for its devices and dtypes (the
    casts eager's autocast makes are traced into the joint graph); the rest, and the backward, outside it."""

    def run_node(self, node: fx.Node):
        pairs = node.meta.get(KEY)
        if not pairs:
            return super().run_node(node)
        with contextlib.ExitStack() as stack:
            for device, dtype in pairs:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return super().run_node(node)


class _LossFirst(_AsTuple):
    """Calls the stage graph and detaches every output but the loss, so only the loss is differentiated."""

    def forward(self, *args):
        outs = self._outputs(args)
        loss = _independent(outs, args, [0])[0]
        return (loss, *(o.detach() if isinstance(o, torch.Tensor) else o for o in outs[1:]))


def _independent(outs: tuple, inputs: tuple, differentiated) -> tuple:
    """`outs` with each differentiated floating-point output that aliases an input or another output cloned.

    AOTAutograd gives an output a tangent of its own only when it aliases nothing else: an output that is an input
    or a view of one, a view of another output (`h` and `h.T`), or one of several views of the same intermediate
    is regenerated from its base outside the compiled graph, and its gradient reaches the base through the
    caller's autograd (Note [AOT Autograd: outputs aliasing inputs or intermediates!] in
    torch/_functorch/_aot_autograd). zb runs the joint graph itself and keys one tangent per output, so such an
    output would lose its gradient (or, for views of an intermediate, come with an extra base tangent zb cannot
    feed). A clone makes it a value of its own, whose tangent flows back into its source inside the joint graph.
    An output that is not a view keeps its storage (it is the base of the others, which are cloned). Runs inside
    AOTAutograd's tracing, on its functional tensors, whose storages show the aliasing exactly as AOTAutograd
    sees it."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def storage(t: torch.Tensor):
        return StorageWeakRef(t.untyped_storage())

    inputs_storages = {storage(a) for a in inputs if isinstance(a, torch.Tensor)}
    shared = collections.Counter(storage(o) for o in outs if isinstance(o, torch.Tensor))
    result = list(outs)
    for i in differentiated:
        o = outs[i]
        if not (isinstance(o, torch.Tensor) and o.is_floating_point()):
            continue
        key = storage(o)
        if key in inputs_storages or (shared[key] > 1 and torch_internals.is_view(o)):
            result[i] = o.clone()
    return tuple(result)


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


def _label_joint(gm: fx.GraphModule, keys_in: list[Key], keys_out: list[Key]) -> None:
    for node in gm.graph.find_nodes(op="placeholder"):
        desc = node.meta.get("desc")
        role = torch_internals.joint_input_role(desc)
        if role is None:
            raise ZbUnsupportedError(f"unexpected joint graph input {node.name} ({desc}); zb cannot run it")
        kind, index = role
        node.meta["zb_key"] = keys_in[index] if kind == "input" else keys_out[index].tangent()
    (out,) = gm.graph.find_nodes(op="output")
    keys = []
    for desc in out.meta["desc"]:
        if desc is None:
            keys.append(None)
            continue
        role = torch_internals.joint_output_role(desc)
        if role is None:
            raise ZbUnsupportedError(
                f"the model's graph has an output zb cannot run yet: {desc}. In-place updates of buffers or "
                "inputs (for example BatchNorm running statistics in training mode) are not supported; use "
                "LayerNorm/GroupNorm or put the module in eval mode."
            )
        kind, index = role
        keys.append(keys_out[index] if kind == "output" else keys_in[index].grad())
    gm.meta["zb_output_keys"] = keys
