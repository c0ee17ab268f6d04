"""split_backward: each stage's backward -> B (input gradients) and W (parameter gradients).

Contract
  input:  `stage.backward` as partition_fw_bw leaves it: placeholders saved:<name> / tangent:<key>, outputs
          grad:<key>, aten-level and functional.
  output: `stage.backward_input` (B): outputs grad:<key> for every non-parameter input that gets a
          gradient (boundary activations act:<name>, user inputs), then stash:<name> for each value W needs from
          B. None when no such input exists.
          `stage.backward_weight` (W): outputs grad:in:<i> for every parameter that gets a gradient.
          None when no parameter gets one.
  Guarantees: B computes no parameter gradient that W does not need from it; W computes nothing B computes
  (shared work runs once, in B, and crosses as a stash value); every parameter gradient is an output of W
  exactly once; no tuple-valued node crosses the cut.

  Fused backward operators that produce an input gradient and a weight gradient in one node and have an
  `output_mask` argument (convolution_backward, native_layer_norm_backward, ...) are cloned: the B copy computes
  only the masked-in outputs B needs, the W copy only the rest. Other multi-output nodes stay in B.

    backward: saved:x, saved:w, tangent:act:y -> grad:act:x (= g @ w), grad:in:0 (= g^T @ x)
    B:        saved:w, tangent:act:y          -> grad:act:x, stash:g
    W:        saved:x, stash:g                -> grad:in:0
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from zb.core import torch_internals
from zb.passes.keys import Key, PieceName, input_key, stash_key
from zb.passes.plan import Plan, ancestors, output_keys, output_values, size_symbols


def split_backward(plan: Plan) -> Plan:
    param_grads = {s.key.grad() for s in plan.parameters}
    for stage in plan.stages:
        if stage.backward is None:
            continue
        bw = copy.deepcopy(stage.backward)  # the unsplit backward stays as it was, for inspection
        results = [(k, v) for k, v in zip(output_keys(bw), output_values(bw)) if k is not None and v is not None]
        b_results = [(k, v) for k, v in results if k not in param_grads]
        w_results = [(k, v) for k, v in results if k in param_grads]
        b_roots = [v for _, v in b_results]
        plan.counters["split_backward.fused_nodes_split"] += _split_fused_nodes(bw.graph, b_roots)
        b_nodes = ancestors(b_roots)
        w_nodes = ancestors([v for _, v in w_results]) - b_nodes
        _keep_getitems_with_their_tuple(w_nodes, b_nodes)

        stash = [n for n in bw.graph.nodes if n in b_nodes and n.op != "placeholder"
                 and any(u in w_nodes for u in n.users)]
        stash += [v for _, v in w_results if v in b_nodes and v.op != "placeholder" and v not in stash]
        b_outputs = b_results + [(stash_key(n.name), n) for n in stash]
        stage.pieces[PieceName.BACKWARD_INPUT] = _extract(bw, b_nodes, b_outputs, {}) if b_results else None
        stage.pieces[PieceName.BACKWARD_WEIGHT] = (
            _extract(bw, w_nodes, w_results, {n: stash_key(n.name) for n in stash}) if w_results else None
        )
        plan.counters["split_backward.b_nodes"] += sum(n.op == "call_function" for n in b_nodes) if b_results else 0
        plan.counters["split_backward.w_nodes"] += sum(n.op == "call_function" for n in w_nodes)
        plan.counters["split_backward.stash_values"] += len(stash) if b_results else 0
    for stage in plan.stages:
        for gm in stage.pieces.values():
            if gm is not None:
                plan.counters["split_backward.sizes_exposed"] += _expose_sizes(gm, plan)
    return plan


def _expose_sizes(gm: fx.GraphModule, plan: Plan) -> int:
    """A piece of a plan traced with symbolic sizes takes each size its values are shaped by as an input of its own
    where none of its inputs shows it alone (W reading only [4*s0, 16] values): Inductor computes the sizes
    of the code it generates from its inputs. The size comes as the plan input that shows it (in:<i>: the size
    itself, or a tensor with that dim). Returns how many inputs were added."""
    shown, needed = set(), set()
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for node in placeholders:
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt):
            dims, strides = [value], []
        elif isinstance(value, torch.Tensor):
            dims, strides = list(value.shape), list(value.stride())
        else:
            continue
        dim_exprs = [torch_internals.sym_expr(d) for d in dims if isinstance(d, torch.SymInt)]
        stride_exprs = [torch_internals.sym_expr(s) for s in strides if isinstance(s, torch.SymInt)]
        needed.update(*(expr.free_symbols for expr in dim_exprs + stride_exprs))
        shown |= {expr for expr in dim_exprs if expr.is_Symbol}
    missing = needed - shown
    if not missing:
        return 0
    providers = {symbol: index for symbol, index, _ in size_symbols(plan.graph, plan.inputs)}
    inputs = list(plan.graph.graph.find_nodes(op="placeholder"))
    keys = {node.meta.get("zb_key") for node in placeholders}
    added = 0
    for symbol in sorted(missing, key=str):
        index = providers.get(symbol)
        if index is None or input_key(index) in keys:
            continue  # (a size no plan input shows: the compiler says so)
        with gm.graph.inserting_after(placeholders[-1]):
            node = gm.graph.placeholder(f"zb_size_{index}")
        node.meta.update(val=inputs[index].meta.get("example_value"), zb_key=input_key(index))
        placeholders.append(node)
        keys.add(input_key(index))
        added += 1
    gm.recompile()
    return added


def _output_mask_index(node: fx.Node) -> int | None:
    schema = torch_internals.op_schema(node.target) if node.op == "call_function" else None
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    return names.index("output_mask") if "output_mask" in names else None


def _split_fused_nodes(graph: fx.Graph, b_roots: list[fx.Node]) -> int:
    """Clone each fused backward node whose outputs B and W both read; return how many were split."""
    b_nodes = ancestors(b_roots)
    count = 0
    for node in list(graph.nodes):
        position = _output_mask_index(node)
        if position is None or node not in b_nodes:
            continue
        getitems = [u for u in node.users if u.target is operator.getitem]
        w_only = [g for g in getitems if g not in b_nodes]
        if not w_only or len(w_only) == len(getitems):
            continue
        mask = list(node.args[position])
        w_mask = [i in {g.args[1] for g in w_only} for i in range(len(mask))]
        b_mask = [m and not w for m, w in zip(mask, w_mask)]
        with graph.inserting_after(node):
            clone = graph.call_function(node.target, _with_arg(node.args, position, w_mask), dict(node.kwargs))
        clone.meta = dict(node.meta)
        node.args = _with_arg(node.args, position, b_mask)
        for g in w_only:
            g.replace_input_with(node, clone)
        count += 1
    return count


def _with_arg(args: tuple, position: int, value) -> tuple:
    return tuple(value if i == position else a for i, a in enumerate(args))


def _keep_getitems_with_their_tuple(w_nodes: set[fx.Node], b_nodes: set[fx.Node]) -> None:
    # A tuple never crosses the cut: a getitem W reads of a B tuple runs in B and its tensor is stashed.
    for node in list(w_nodes):
        if node.target is operator.getitem and node.args[0] in b_nodes:
            w_nodes.discard(node)
            b_nodes.add(node)


def _extract(bw: fx.GraphModule, nodes: set[fx.Node], outputs, stash_inputs: dict[fx.Node, Key]) -> fx.GraphModule:
    """A new graph with `nodes` (in their original order) computing `outputs`, a list of (key, node)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def placeholder(node: fx.Node, key: Key) -> fx.Node:
        new = graph.placeholder(node.name)
        new.meta = {"val": node.meta.get("val"), "zb_key": key, "zb_stage": node.meta.get("zb_stage")}
        return new

    read = {v for _, v in outputs} | {i for n in nodes if n.op == "call_function" for i in n.all_input_nodes}
    for node in bw.graph.nodes:
        if node in stash_inputs and node in read:
            env[node] = placeholder(node, stash_inputs[node])
        elif node.op == "placeholder" and node in read:
            env[node] = placeholder(node, node.meta["zb_key"])
    for node in bw.graph.nodes:
        if node in nodes and node.op == "call_function" and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[v] for _, v in outputs))
    graph.eliminate_dead_code()
    gm = fx.GraphModule(bw, graph)
    gm.meta["zb_output_keys"] = [k for k, _ in outputs]
    return gm
