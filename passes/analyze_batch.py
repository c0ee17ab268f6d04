"""analyze_batch: which dimensions of every value carry the batch, and which operations mix samples.

zb runs the model one microbatch at a time. That gives eager's result only when every value is computed per
sample: no operation may reduce, scan, sort, permute, normalise, compare or index *across* the samples of the
batch. This pass proves that from the operations' semantics, not from sizes: it runs the graph once on fake
tensors (no data, no FLOPs) and, for every aten operation it dispatches, derives which dimensions of each output
carry the batch from which dimensions of the inputs do (`batch_rules.py` holds the rules). An operation that
works across a batch-carrying dimension is recorded as mixing samples, with its torch-level node and source line.

Contract
  input:  `plan.graph` (after fuse_attention), `plan.inputs` (`batched`: split along dim 0), one microbatch's
          `plan.example_inputs`. Runs only when the batch is split (microbatches x data-parallel replicas > 1).
  output: `plan.batch` (a `BatchAnalysis`): for every node of `plan.graph`, the batch dims of its tensor value,
          and the list of operations that mix samples (`Mixing`). normalize_loss excuses the reductions that are
          the loss's own (a mean, a sum, a token mean over the batch) and refuses the rest.

    h = x @ w          x: {0}       ->  h: {0}          (per sample)
    h = h.flatten(0,1) [B, T, H]    ->  [B*T, H]: {0}   (the batch stays outermost)
    h = h.softmax(0)   {0}          ->  Mixing("softmax over a batch dimension")

The per-value facts (`batch_facts.Value`): `dims` maps each batch-carrying dimension to its layout (the
per-sample extent: how many consecutive positions along it one sample covers; ("tiled", repeat, block) when the
batch repeats along it; None when unknown), `stat` marks a value computed from several samples (a reduction over
the batch), `uniform` the dims along which a value is constant or random (zeros, an expanded position table, a
dropout mask), which may line up with the batch without mixing, and `route` the mixture-of-experts routing facts
(rows grouped by a sort over the batch, the sort's indices, its inverse, the group counts) that make a token's
result depend on that token alone.

Rules come from three places, in order: zb's own (`batch_rules.py`), DTensor's sharding propagation for aten
operations zb has no rule for (a batch dimension is `Shard(d)`: an operation that keeps `Shard` without
redistribution is per sample), and, for an operation neither knows (a custom operator, a user kernel), an
empirical check on random data: the operation runs on two microbatches joined and on each alone, and must give
the joined result. Anything else mixes samples.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from zb.core import torch_internals
from zb.passes import batch_rules
from zb.passes.batch_facts import NONE, Layout, Value, tensors
from zb.passes.plan import Plan


@dataclass(frozen=True)
class Mixing:
    """One operation that mixes samples across the batch."""

    node: str  # the torch-level node of plan.graph whose computation dispatched the operation
    op: str  # the aten operation
    why: str
    kind: str  # "reduction" (reduces over the batch), "statistic" (uses such a reduction per sample), "other"
    source: str  # the user's source line (from the node's stack trace), or ""


@dataclass
class BatchAnalysis:
    """What analyze_batch found (see the module docstring)."""

    microbatch: int  # samples per microbatch
    dims: dict[str, dict[int, Layout]] = field(default_factory=dict)  # node name -> batch dim -> layout
    stat: set[str] = field(default_factory=set)  # nodes whose value is computed from several samples
    mixing: list[Mixing] = field(default_factory=list)
    rules: collections.Counter = field(default_factory=collections.Counter)  # which rule source answered

    def batch_dims(self, node: str) -> dict[int, Layout]:
        return self.dims.get(node, {})


def analyze_batch(plan: Plan) -> Plan:
    if plan.splits == 1:
        return plan
    batched = [s.index for s in plan.inputs if s.batched]
    sizes = {plan.example_inputs[i].shape[0] for i in batched}
    result = BatchAnalysis(microbatch=min(sizes) if sizes else 1)
    batch_rules.register_known_custom_ops()
    if batched:
        _Run(plan, result).run()
    plan.batch = result
    for source, count in result.rules.items():
        plan.counters[f"analyze_batch.{source}"] = count
    plan.counters["analyze_batch.mixing"] = len(result.mixing)
    return plan


class _Run(fx.Interpreter):
    """Runs plan.graph on fake tensors under a dispatch mode that applies the batch rules to every aten op."""

    def __init__(self, plan: Plan, result: BatchAnalysis):
        super().__init__(plan.graph)
        self.plan = plan
        self.result = result
        self.values: dict[int, tuple[torch.Tensor, Value]] = {}  # id(tensor) -> (tensor kept alive, its facts)
        self.storages: dict[int, dict[int, torch.Tensor]] = {}  # storage -> the tensors on it
        self.current: fx.Node | None = None
        self.reported: set[str] = set()
        self.fake_mode = batch_rules.fake_mode()

    def run(self) -> None:  # type: ignore[override]
        fake = [self.fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t
                for t in self.plan.example_inputs]
        for spec, value in zip(self.plan.inputs, fake):
            if spec.batched:
                self.set(value, Value(dims={0: 1}))
        with self.fake_mode, _Dispatch(self), torch.no_grad():
            outputs = super().run(*fake)
        (node,) = self.plan.graph.graph.find_nodes(op="output")
        self.current = node
        for t in tensors(outputs):  # a value left in the order of a routing sort is not the batch's order
            route = self.get(t).route
            if route is not None and route[0] in ("rows", "keys", "index", "inverse"):
                self.mix("output", "returns values in the order of a sort over the batch, not the batch's order",
                         "other")

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        out = super().run_node(n)
        first = next(iter(tensors(out)), None)
        if first is not None:
            value = self.get(first)
            if value.dims:
                self.result.dims[n.name] = dict(value.dims)
            if value.stat:
                self.result.stat.add(n.name)
        return out

    def get(self, t: torch.Tensor) -> Value:
        held = self.values.get(id(t))
        return held[1] if held is not None and held[0] is t else NONE

    def set(self, t: torch.Tensor, value: Value) -> None:
        self.values[id(t)] = (t, value)
        self.track(t)

    def track(self, t: torch.Tensor) -> None:
        """Remember `t` under its storage, so a write through one alias reaches the others."""
        key = StorageWeakRef(t.untyped_storage()).cdata
        same = self.storages.setdefault(key, {})
        same.setdefault(id(t), t)

    def aliases(self, t: torch.Tensor) -> list[torch.Tensor]:
        key = StorageWeakRef(t.untyped_storage()).cdata
        return [o for o in self.storages.get(key, {}).values() if o is not t]

    def mix(self, op: str, why: str, kind: str) -> None:
        node = self.current
        name = node.name if node is not None else "?"
        if name in self.reported and kind != "reduction":
            return
        self.reported.add(name)
        self.result.mixing.append(Mixing(name, op, why, kind, source_line(node)))


class _Dispatch(torch_internals.TorchDispatchMode):
    """Sees every aten op the batch analysis' run dispatches, and hands it to the run's rules."""

    def __init__(self, run: _Run):
        super().__init__()
        self.run = run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(func, torch_internals.OpOverload):
            batch_rules.apply(self.run, func, args, kwargs, out)
        return out


def source_line(node: fx.Node | None) -> str:
    """The user's line that made `node` ("file:line: code"), from the node's stack trace."""
    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith("File "):
            where = line.split(",")
            file = where[0][len("File "):].strip('"')
            number = where[1].strip().removeprefix("line ") if len(where) > 1 else "?"
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{file}:{number}: {code}"
    return ""
