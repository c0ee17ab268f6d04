"""The compiled pipelines of one Dynamo graph, by input signature, bounded.

A graph Dynamo made dynamic (a new sequence length under dynamic padding) serves every later shape. zb builds one
pipeline with those sizes symbolic, keyed by the signature without them and admitted per call by its shape guards
(`Entry.guards`), and a pipeline per shape for what they do not admit (or with option symbolic_sizes=False). They
are kept here, keyed by the call's signature (the shapes, dtypes and devices of its tensors, named by where Dynamo
read them from), so a signature seen before costs nothing. At most `options.plan_cache` signatures are kept; the
least recently used one is dropped (its plan, compiled pieces and runner freed) when another arrives. Dynamo's
graphs of one function share a cache only when their code is the same (with the same models and options): each graph
bakes in its own constants (a flag, `module.training`, static sizes) that the signature does not see, and the code
shows them. Identical code comes back when Dynamo traces again only because a guard on a tensor's type failed (zb
releasing a parameter, or materialising a meta-built one), and that trace then finds its pipelines built.
"""

from __future__ import annotations

import collections
import logging
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from zb.passes import Plan
from zb.runtime import PipelineRunner

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One signature's pipeline: its plan, what runs it (None when only planning), and the Dynamo source of each of
    the plan's inputs (how the graph finds them among its arguments)."""

    plan: Plan
    runner: PipelineRunner | None
    sources: list[str]
    # A plan traced with symbolic sizes: whether it serves a call (its inputs in plan order); None for a static plan.
    guards: Callable[[list[Any]], bool] | None = None
    dynamic: dict = field(default_factory=dict)  # the dims traced symbolic (position -> dims); a re-cut keeps them


class PlanCache:
    """An LRU map from signature to Entry."""

    def __init__(self, options: Any, modules: list[Any]):
        self.options = options
        self.modules = [weakref.ref(m) for m in modules]
        self.size = options.plan_cache
        self.entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()
        self.rebalanced: set[tuple] = set()  # signatures whose stages were (or were decided not to be) re-cut
        self.evicted = 0

    def get(self, key: tuple) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: Entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            old, _ = self.entries.popitem(last=False)
            self.evicted += 1  # (its re-cut decision stays: a signature built again is not re-cut again)
            log.info("zb: freed the pipeline of the least recently used input signature (option plan_cache=%d): %s",
                     self.size, _describe(old))

    def serves(self, options: Any, modules: list[Any]) -> bool:
        """Whether this cache belongs to these options and exactly these (live) models."""
        return options == self.options and len(modules) == len(self.modules) and all(
            r() is m for r, m in zip(self.modules, modules))


_CACHES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared(key: Any, options: Any, modules: list[Any]) -> PlanCache:
    """The cache of the graph `key` (the frame's code and the graph's code) with these options and models: the
    existing one when an identical graph made one, else a new one. Kept alive by the graphs that use it."""
    cache = _CACHES.get(key) if key is not None else None
    if cache is None or not cache.serves(options, modules):
        cache = PlanCache(options, modules)
        if key is not None:
            _CACHES[key] = cache
    return cache


def graph_identity(gm: fx.GraphModule) -> tuple:
    """What makes two Dynamo graphs of one frame the same computation, for sharing their pipelines: each node's
    operation, target and arguments, with an operator written as a method (`w.mul(x)`, which Dynamo traces for a
    tensor subclass such as a parameter zb released) the same as the operator (`w * x`), and without the inputs'
    classes."""
    items = []
    for node in gm.graph.nodes:
        op, target = node.op, node.target
        if op == "call_method" and callable(getattr(operator, target, None)):
            op, target = "call_function", getattr(operator, target)
        if callable(target):
            target = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
        body = getattr(gm, node.target, None) if op == "get_attr" else None
        if isinstance(body, fx.GraphModule):  # the body of a higher-order op (an activation-checkpointed block)
            target = graph_identity(body)
        items.append((node.name, op, target, repr(node.args), repr(node.kwargs)))
    return tuple(items)


def caches_of(model: Any) -> list[PlanCache]:
    """Every cache whose graphs train `model`."""
    return [cache for cache in list(_CACHES.values()) if any(r() is model for r in cache.modules)]


def _describe(key: tuple) -> str:
    shapes = [f"{source}{list(sig[0])}" for source, sig in key[1:] if isinstance(sig, tuple) and sig
              and isinstance(sig[0], tuple)]
    return ", ".join(shapes) or str(key)
