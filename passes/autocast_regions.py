"""autocast_regions: torch.autocast inside and around the compiled function -> an annotation on every operation.

Contract
  input:  `plan.graph` as Dynamo traced it, possibly with `_enter_autocast` / `_exit_autocast` nodes (a
          `with torch.autocast(...)` inside the function), and `plan.autocast`: the autocast state in effect when
          the call was made (device type -> (enabled, dtype), for "cpu" and "cuda").
  output: `plan.graph` (and `plan.batch_graph`) a copy without the enter and exit nodes, in which every operation
          that eager would run under autocast carries `meta["zb_autocast"]`: a tuple of (device type, dtype) pairs.
          Nothing changes (no copy) when no autocast is in effect anywhere.

Stages are cut from this graph and each is traced on its own (capture_joint), so a region that began in one stage
and ends in another cannot stay a pair of enter and exit calls. capture_joint runs each annotated operation inside
`torch.autocast` for its pairs: the joint graph then carries the casts eager's autocast makes, op by op, in the
forward; the backward is traced outside autocast, as eager's backward runs (autograd of the casts brings the
gradients back to the parameters' dtype). fuse_attention casts q, k, v to the autocast dtype where eager's autocast
would (scaled_dot_product_attention, matmul), so the fused attention runs in it.

    plan.autocast = {"cpu": (True, torch.bfloat16), ...}   (the call was made under torch.autocast("cpu", bf16))
    linear(x, w)            -> meta["zb_autocast"] = (("cpu", torch.bfloat16),)
"""

from __future__ import annotations

import torch
from torch import fx

from zb.core import torch_internals
from zb.core.errors import ZbUnsupportedError
from zb.passes.plan import Plan

KEY = "zb_autocast"


def autocast_regions(plan: Plan) -> Plan:
    # plan.autocast: device type -> (enabled, dtype) at the call; a region entered with dtype=None takes the dtype
    # in effect, which a disabled state keeps too.
    ambient = {device: tuple(state) for device, state in plan.autocast.items()}
    graphs = [plan.graph] + ([plan.batch_graph] if plan.batch_graph is not None else [])
    if not any(enabled for enabled, _ in ambient.values()) and not any(_enters(gm) for gm in graphs):
        return plan
    plan.graph = _annotated(plan.graph, ambient)
    if plan.batch_graph is not None:
        plan.batch_graph = _annotated(plan.batch_graph, ambient)
    plan.counters["autocast_regions.operations"] = sum(KEY in n.meta for n in plan.graph.graph.nodes)
    return plan


def _enters(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch_internals.ENTER_AUTOCAST]


def _annotated(original: fx.GraphModule, ambient: dict[str, tuple[bool, torch.dtype]]) -> fx.GraphModule:
    """A copy of `original` with each operation's autocast state in its meta and the enter/exit nodes removed."""
    env: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph()
    states: list[dict[str, tuple[bool, torch.dtype]]] = [dict(ambient)]
    entered: dict[fx.Node, int] = {}
    annotated = []
    for node in original.graph.nodes:
        target = node.target if node.op == "call_function" else None
        if target is torch_internals.ENTER_AUTOCAST:
            entered[node] = len(states)
            states.append(_entered(states[-1], node))
            continue
        if target is torch_internals.EXIT_AUTOCAST:
            depth = entered.get(node.args[0])
            if depth is None or depth != len(states) - 1:
                raise ZbUnsupportedError("torch.autocast regions in the compiled function do not nest as zb "
                                         "expects (an exit without its enter); keep each `with torch.autocast` "
                                         "block inside the function")
            states.pop()
            continue
        copied = graph.node_copy(node, lambda a: env[a])
        pairs = _pairs(states[-1])
        if pairs and node.op in ("call_function", "call_method", "call_module"):
            copied.meta[KEY] = pairs
        annotated.append((copied, states[-1]))
        env[node] = copied
    if len(states) != 1:
        raise ZbUnsupportedError("a torch.autocast region in the compiled function is not closed inside it; "
                                 "keep each `with torch.autocast` block inside the function")
    gm = fx.GraphModule(original, graph)
    gm.meta.update(original.meta)
    for node, state in annotated:  # subgraph bodies (activation checkpointing): their operations too
        for arg in node.args:
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                body = getattr(gm, arg.target, None)
                if isinstance(body, fx.GraphModule):
                    _annotate_body(body, state)
    return gm


def _entered(state: dict, node: fx.Node) -> dict:
    """The state inside `node`'s region, as torch.autocast itself resolves it: dtype None keeps the dtype in
    effect. A dtype autocast does not support on this device is refused: eager would disable the region with a
    warning and run it in float32, which is not what the code asks for (dtype=torch.float32 is; a "cuda" region
    on a machine without CUDA only touches CUDA tensors: both resolve as eager does, disabled)."""
    import warnings

    device, dtype = node.args[0], node.args[1]
    enabled = node.args[2] if len(node.args) > 2 else node.kwargs.get("enabled", True)
    current = state.get(device, (False, torch.get_autocast_dtype(device)))[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        region = torch.autocast(device, dtype=dtype if dtype is not None else current, enabled=enabled)
    on = torch_internals.autocast_enabled(region)
    # float32 asks for what a disabled region runs; autocast("cuda") without CUDA cannot touch this model's ops
    if enabled and not on and dtype != torch.float32 and (device != "cuda" or torch.cuda.is_available()):
        said = f" (torch: {caught[0].message})" if caught else ""
        raise ZbUnsupportedError(
            f"torch.autocast({device!r}, dtype={dtype}) in the compiled function is not supported on this machine"
            f"{said}; eager would run the region in float32 with a warning. Use a dtype the device supports "
            "(CPU: torch.bfloat16 or torch.float16; CUDA: torch.float16, or torch.bfloat16 where the GPU has it), "
            "or remove the region")
    new = dict(state)
    new[device] = (on, region.fast_dtype)
    return new


def _pairs(state: dict) -> tuple:
    return tuple(sorted((device, dtype) for device, (enabled, dtype) in state.items() if enabled))


def _annotate_body(body: fx.GraphModule, state: dict) -> None:
    """Annotate a subgraph body's operations (its own enter/exit nodes stay: the body runs whole, in one stage),
    so that fuse_attention sees the autocast state inside it too."""
    states = [state]
    for node in body.graph.nodes:
        target = node.target if node.op == "call_function" else None
        if target is torch_internals.ENTER_AUTOCAST:
            states.append(_entered(states[-1], node))
        elif target is torch_internals.EXIT_AUTOCAST and len(states) > 1:
            states.pop()
        elif node.op in ("call_function", "call_method", "call_module") and _pairs(states[-1]):
            node.meta[KEY] = _pairs(states[-1])
