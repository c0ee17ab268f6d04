"""partition_stages: the Dynamo graph -> one torch-level graph per pipeline stage.

Contract
  input:  `plan.graph` (Dynamo's graph of one microbatch, parameters lifted to inputs), `plan.example_inputs`,
          `plan.num_stages`, and `plan.options.split_points` (module paths where a stage begins) or none.
  output: `plan.stages[s].graph` for every stage: placeholders in:<i> (graph inputs the stage reads: its
          parameters, buffers, user inputs) and act:<name> (values computed by earlier stages); outputs
          act:<name> (every value a later stage reads) on stages before the last, out:<j> on the last.
          `stage.example_inputs` holds one microbatch's values for the placeholders.
  A value that a later stage needs passes through the stages in between (as a copy, so that its gradient flows
  back through each of them). Cuts come from `split_points` or balance the estimated cost (FLOPs on fake tensors)
  while keeping the bytes crossing each cut small.

    Dynamo:   x, w0, w1 -> h = x @ w0 ; y = h @ w1 ; loss = y.sum()
    stage 0:  in:0 (x), in:1 (w0) -> act:h
    stage 1:  act:h, in:2 (w1)    -> out:0
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from zb.core import torch_internals
from zb.core.errors import ZbOptionError, ZbUnsupportedError
from zb.passes.keys import Kind, act_key, input_key, output_key
from zb.passes.plan import Plan, Stage, concrete, fake_like, nbytes, output_keys, size_symbols

BALANCE_WINDOW = 0.05  # a cut may move this fraction of the total cost away from the even split to cross less


def partition_stages(plan: Plan) -> Plan:
    graph = plan.graph.graph
    compute = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    n = plan.num_stages
    if n < 1:
        raise ZbOptionError(f"a pipeline needs at least one stage, got {n}")
    if n > 1 and len(compute) < n:
        raise ZbUnsupportedError(f"the model's graph has {len(compute)} operations, too few for {n} stages")
    plan.operations = tuple(_operation(node) for node in compute)
    if n == 1:
        cuts = []
    elif plan.options.split_points:
        cuts = _cuts_at_split_points(compute, plan.options.split_points, n)
    elif plan.keep_cuts is not None:
        cuts = _kept_cuts(plan.keep_cuts, plan.operations)
    else:
        costs = _refined(_estimate_costs(plan, compute), plan.measured_stage_times, plan.previous_cuts)
        cuts = _balanced_cuts(plan, compute, n, costs)
        bounds = [0, *cuts, len(compute)]
        plan.stage_costs = tuple(sum(costs[bounds[s]: bounds[s + 1]]) for s in range(n))
    plan.cuts = tuple(cuts)
    stage_of = {}
    bounds = [0, *cuts, len(compute)]
    for s in range(n):
        for node in compute[bounds[s]: bounds[s + 1]]:
            stage_of[node] = s
    plan.stages = [Stage(index=s) for s in range(n)]
    for stage in plan.stages:
        stage.graph, stage.example_inputs = _stage_graph(plan, stage.index, stage_of)
    plan.counters["partition_stages.stages"] = n
    plan.counters["partition_stages.boundary_values"] = sum(
        sum(1 for k in output_keys(s.graph) if k.is_(Kind.ACT)) for s in plan.stages[:-1]
    )
    return plan


def _operation(node: fx.Node) -> str:
    target = node.target
    return f"{node.op}:{target if isinstance(target, str) else getattr(target, '__name__', str(target))}"


def _kept_cuts(keep: tuple[tuple[int, ...], tuple[str, ...]], operations: tuple[str, ...]) -> list[int]:
    """The earlier plan's cuts, for a graph with the same operations in the same order up to its last cut (another
    input shape; evaluation, whose graph may end differently). The runner checks that no stage reads a tensor its
    rank released (runtime/runner.py `_check_held`)."""
    cuts, earlier = keep
    upto = max(cuts, default=-1) + 1
    if operations[:upto] != earlier[:upto]:
        differ = next((i for i, (a, b) in enumerate(zip(operations, earlier)) if a != b),
                      min(len(operations), len(earlier)))
        raise ZbUnsupportedError(
            "option release: every input of this model must be cut into stages at the same places, so that each "
            "rank's stages read only the parameters it holds, but this input's graph differs from the first one's "
            f"({len(operations)} against {len(earlier)} operations, from operation {differ} on). Name where stages "
            "begin with options={'split_points': [...]}, or keep every tensor on every rank with release=False")
    return list(cuts)


def split_points_for(plan: Plan) -> list[str]:
    """A `split_points` option close to `plan.cuts`: for each cut, the module (of those the cut's node belongs to)
    whose first node is nearest the cut, the outermost on a tie."""
    compute = [n for n in plan.graph.graph.nodes if n.op not in ("placeholder", "output")]
    points: list[str] = []
    for cut in plan.cuts:
        paths = [p for p in _module_paths(compute[cut]) if p and p not in points]
        if paths:
            points.append(min(paths, key=lambda p: abs(_first_node_of(compute, p) - cut)))
    return points


def _first_node_of(compute: list[fx.Node], path: str) -> int | None:
    return next((i for i, node in enumerate(compute) if path in _module_paths(node)), None)


def _module_paths(node: fx.Node) -> list[str]:
    """Dynamo records L['self'].blocks.4 for the module a node came from; return 'blocks.4' and its parents."""
    stack = node.meta.get("nn_module_stack") or {}
    return [re.sub(r"^[LG]\['[^']*'\]\.?", "", path) for path, _ in stack.values()]


def _cuts_at_split_points(compute: list[fx.Node], split_points, n: int) -> list[int]:
    if len(split_points) != n - 1:
        raise ZbOptionError(f"split_points names {len(split_points)} module(s) for {n} stages; give exactly "
                            f"{n - 1} (each is where a new stage begins), or drop split_points to balance costs")
    cuts = []
    for point in split_points:
        index = _first_node_of(compute, point)
        if index is None:
            known = sorted({p for node in compute for p in _module_paths(node) if p.count(".") <= 1})
            raise ZbOptionError(f"split point {point!r} names no module the model runs; modules: "
                                f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
        if cuts and index <= cuts[-1]:
            raise ZbOptionError(f"split point {point!r} begins before the previous one; list them in model order")
        if index == 0:
            raise ZbOptionError(f"split point {point!r} is the start of the model: the first stage would be empty")
        cuts.append(index)
    return cuts


def _balanced_cuts(plan: Plan, compute: list[fx.Node], n: int, costs: list[float]) -> list[int]:
    crossing = _crossing_bytes(plan.graph.graph, compute)
    total = sum(costs) or 1.0
    slack = BALANCE_WINDOW if plan.balance_window is None else plan.balance_window
    prefix, running = [], 0.0
    for c in costs:
        running += c
        prefix.append(running)  # prefix[i]: cost of compute[0..i]
    blocked = _uncuttable(compute)
    cuts: list[int] = []
    for j in range(1, n):
        target = j * total / n
        lo = (cuts[-1] + 1) if cuts else 1
        hi = len(compute) - (n - j)
        allowed = [i for i in range(lo, hi + 1) if i not in blocked] or list(range(lo, hi + 1))
        window = [i for i in allowed if abs(prefix[i - 1] - target) <= slack * total]
        if not window:
            window = [min(allowed, key=lambda i: abs(prefix[i - 1] - target))]
        cuts.append(min(window, key=lambda i: (crossing[i], abs(prefix[i - 1] - target))))
    return cuts


def _uncuttable(compute: list[fx.Node]) -> set[int]:
    """Cut positions that would send something other than a tensor to the next stage: between a tuple-valued node
    (a checkpointed region, a split) and its getitems, or a subgraph (get_attr) and the higher-order op using it;
    and positions inside a no_grad region, whose grad mode a stage boundary would lose."""
    position = {node: i for i, node in enumerate(compute)}
    blocked: set[int] = set()
    disabled_at = None  # inside `with torch.no_grad():` (each stage's graph is traced with grad enabled)
    for i, node in enumerate(compute):
        if node.target is torch_internals.SET_GRAD_ENABLED:
            if not node.args[0] and disabled_at is None:
                disabled_at = i
            elif node.args[0] and disabled_at is not None:
                blocked.update(range(disabled_at + 1, i + 1))
                disabled_at = None
    for node in compute:
        if node.target is torch_internals.SET_GRAD_ENABLED or (
                node.op != "get_attr" and isinstance(node.meta.get("example_value"), torch.Tensor)):
            continue
        last = max((position.get(u, position[node]) for u in node.users), default=position[node])
        blocked.update(range(position[node] + 1, last + 1))
    return blocked


def costs_measured(plan: Plan) -> bool:
    measured, previous = plan.measured_stage_times, plan.previous_cuts
    return bool(measured) and previous is not None and len(measured) == len(previous) + 1


def _refined(costs: list[float], measured, previous_cuts) -> list[float]:
    """Scale each old stage's node estimates so that they sum to its measured time."""
    if not measured or previous_cuts is None or len(measured) != len(previous_cuts) + 1:
        return costs  # measured for other cuts (or not at all): FLOPs alone
    bounds = [0, *previous_cuts, len(costs)]
    refined = list(costs)
    for s, seconds in enumerate(measured):
        estimate = sum(costs[bounds[s]: bounds[s + 1]])
        if estimate > 0 and seconds > 0:
            for i in range(bounds[s], bounds[s + 1]):
                refined[i] = costs[i] * seconds / estimate
    return refined


def _attribute(module: torch.nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _estimate_costs(plan: Plan, compute: list[fx.Node]) -> list[float]:
    """FLOPs of each node, run on the fake tensors Dynamo recorded; nodes without FLOPs cost a little memory."""
    values = [n.meta.get("example_value") for n in compute]
    fake_mode = torch_internals.detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    env: dict[fx.Node, object] = {}
    for node in plan.graph.graph.find_nodes(op="placeholder"):
        env[node] = node.meta.get("example_value")
    for node in plan.graph.graph.find_nodes(op="get_attr"):  # the body of a higher-order op (a checkpoint)
        env[node] = _attribute(plan.graph, node.target)
    costs = []
    for node in compute:
        flops = 0.0
        if fake_mode is not None and node.op in ("call_function", "call_method"):
            try:
                args = fx.node.map_arg(node.args, lambda a: env.get(a))
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env.get(a))
                with fake_mode, FlopCounterMode(display=False) as counter:
                    if node.op == "call_function":
                        node.target(*args, **kwargs)
                    else:
                        getattr(args[0], node.target)(*args[1:], **kwargs)
                flops = float(concrete(counter.get_total_flops()))  # (at the traced sizes: a symbolic one too)
            except Exception:  # an op fake tensors cannot run: fall back to its size  # noqa: BLE001
                flops = 0.0
        if node.op != "get_attr":
            env[node] = node.meta.get("example_value")
        value = node.meta.get("example_value")
        size = concrete(value.numel()) if isinstance(value, torch.Tensor) else 0
        costs.append(flops + size)
    return costs


def _crossing_bytes(graph: fx.Graph, compute: list[fx.Node]) -> list[int]:
    """crossing[i]: bytes of values computed before compute[i] and read at or after it."""
    position = {node: i for i, node in enumerate(compute)}
    end = len(compute)
    delta = [0] * (end + 2)
    for node in compute:
        last = max((position.get(u, end) for u in node.users), default=position[node])
        if last > position[node]:
            size = nbytes(node.meta.get("example_value"))
            delta[position[node] + 1] += size
            delta[last + 1] -= size
    crossing, running = [], 0
    for i in range(end + 1):
        running += delta[i]
        crossing.append(running)
    return crossing


def _stage_graph(plan: Plan, s: int, stage_of: dict[fx.Node, int]) -> tuple[fx.GraphModule, list]:
    graph = plan.graph.graph
    last = plan.num_stages - 1
    (output,) = graph.find_nodes(op="output")
    outputs = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]

    def needed_after(node: fx.Node) -> bool:
        later_users = any(stage_of.get(u, last) > s for u in node.users if u.op != "output")
        return later_users or (node in outputs and s < last)

    # Values a stage reads from earlier stages: everything computed before it that it or a later stage reads.
    incoming = [n for n in graph.nodes if n in stage_of and stage_of[n] < s and
                (any(stage_of.get(u) == s for u in n.users) or needed_after(n) or (s == last and n in outputs))]
    mine = [n for n in graph.nodes if stage_of.get(n) == s]
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    examples = []
    placeholders = {n: i for i, n in enumerate(graph.find_nodes(op="placeholder"))}
    symbolic = bool(size_symbols(plan.graph, plan.inputs))  # traced with fake tensors of symbolic sizes: all alike
    for node in graph.find_nodes(op="placeholder"):
        if any(stage_of.get(u) == s for u in node.users) or (s == last and node in outputs):
            env[node] = new.placeholder(node.name)
            env[node].meta = {"zb_key": input_key(placeholders[node]), "example_value": node.meta.get("example_value")}
            index = placeholders[node]
            example = plan.traced_inputs.get(index, plan.example_inputs[index])
            if symbolic:
                example = fake_like(node.meta["example_value"], getattr(example, "requires_grad", False))
            examples.append(example)
    for node in incoming:
        env[node] = new.placeholder(f"act_{node.name}")
        env[node].meta = {"zb_key": act_key(node.name), "example_value": node.meta.get("example_value")}
        examples.append(_example(node.meta.get("example_value"), plan.training, symbolic))
    for node in mine:
        env[node] = new.node_copy(node, lambda a: env[a])
    if s < last:
        leaving = [n for n in incoming + mine if needed_after(n)]
        results = [_copy_if_passthrough(new, env[n], n in incoming) for n in leaving]
        keys = [act_key(n.name) for n in leaving]
    else:
        results = [env[v] if isinstance(v, fx.Node) else v for v in outputs]
        keys = [output_key(j) for j in range(len(outputs))]
    new.output(tuple(results))
    for node in new.nodes:
        node.meta["zb_stage"] = s
    gm = fx.GraphModule(plan.graph, new)
    gm.meta["zb_output_keys"] = keys
    return gm, examples


def _copy_if_passthrough(graph: fx.Graph, value: fx.Node, passthrough: bool) -> fx.Node:
    # An output that is an input gets no gradient from AOTAutograd; a copy makes it a value of this stage.
    if not passthrough:
        return value
    copy = graph.call_method("clone", (value,))
    copy.meta = dict(value.meta)
    return copy


def _example(value, training: bool, symbolic: bool):
    """A tensor shaped like Dynamo's fake one, needing a gradient when the activation does: real, or fake (of the
    same symbolic sizes) when the graph is symbolic."""
    if not isinstance(value, torch.Tensor):
        return value
    requires_grad = training and value.requires_grad and value.is_floating_point()
    if symbolic:
        return fake_like(value, requires_grad)
    return torch.zeros(value.shape, dtype=value.dtype, device=value.device).requires_grad_(requires_grad)
