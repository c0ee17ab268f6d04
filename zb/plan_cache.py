"""The compiled pipelines of one compiled function, by input signature: shared by Dynamo's recompiles, bounded.

Dynamo compiles a function again when its inputs change shape (a new sequence length under dynamic padding): first
at static shapes, then, after a second shape, once more with the changed sizes symbolic. Each of those graphs is a
`CompiledGraph`, and each would build its own pipeline for every shape it sees, so that going back to a length seen
before planned and compiled it again. The pipelines live here instead, keyed by the call's signature (the shapes,
dtypes and devices of its tensors, named by where Dynamo read them from), and every graph of the same function,
model and options finds them. At most `options.plan_cache` signatures are kept; the least recently used one is
dropped (its plan, compiled pieces and runner freed) when another arrives.
"""

from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass
from typing import Any

from zb.passes import Plan
from zb.runtime import PipelineRunner

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One signature's pipeline: its plan, what runs it (None when only planning), and the Dynamo source of each of
    the plan's inputs (how a graph finds them among its own arguments)."""

    plan: Plan
    runner: PipelineRunner | None
    sources: list[str]


class PlanCache:
    """An LRU map from signature to Entry, for the graphs of one compiled function."""

    def __init__(self, options: Any, modules: list[Any]):
        self.options = options
        self.size = options.plan_cache
        self.modules = [weakref.ref(m) for m in modules]
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
            self.rebalanced.discard(old)
            self.evicted += 1
            log.info("zb: freed the pipeline of the least recently used input signature (option plan_cache=%d): %s",
                     self.size, _describe(old))

    def serves(self, options: Any, modules: list[Any]) -> bool:
        """Whether this cache belongs to these options and exactly these (live) models."""
        return options == self.options and len(modules) == len(self.modules) and all(
            r() is m for r, m in zip(self.modules, modules))


_CACHES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared(code: Any, options: Any, modules: list[Any]) -> PlanCache:
    """The cache of the function `code` compiled with equal options over these models (a new one the first time,
    or when the options or models differ). Kept alive by the graphs that use it."""
    cache = _CACHES.get(code) if code is not None else None
    if cache is None or not cache.serves(options, modules):
        cache = PlanCache(options, modules)
        if code is not None:
            _CACHES[code] = cache
    return cache


def _describe(key: tuple) -> str:
    shapes = [f"{source}{list(sig[0])}" for source, sig in key[1:] if isinstance(sig, tuple) and sig
              and isinstance(sig[0], tuple)]
    return ", ".join(shapes) or str(key)
