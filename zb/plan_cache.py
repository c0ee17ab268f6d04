"""The compiled pipelines of one Dynamo graph, by input signature, bounded.

A graph Dynamo made dynamic (a new sequence length under dynamic padding) serves every later shape, and zb builds a
pipeline per shape it sees (trace at that shape, plan, compile). They are kept here, keyed by the call's signature
(the shapes, dtypes and devices of its tensors, named by where Dynamo read them from), so a length seen before costs
nothing. At most `options.plan_cache` signatures are kept; the least recently used one is dropped (its plan,
compiled pieces and runner freed) when another arrives. The cache is per graph, never shared between Dynamo's
graphs of one function: each graph bakes in its own constants (flags, `module.training`), which the signature does
not see.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

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


class PlanCache:
    """An LRU map from signature to Entry."""

    def __init__(self, size: int):
        self.size = size
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


def _describe(key: tuple) -> str:
    shapes = [f"{source}{list(sig[0])}" for source, sig in key[1:] if isinstance(sig, tuple) and sig
              and isinstance(sig[0], tuple)]
    return ", ".join(shapes) or str(key)
