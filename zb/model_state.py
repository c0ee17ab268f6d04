"""Which of a model's tensors this process holds, from the plan that says which rank owns what.

When a model's pipeline is first built, the model's deferred tensors (zb.defer) get values (zb/materialize.py): with
option release, only those this process's stages read, and a pipeline rank then frees the parameters and buffers
other ranks own (runtime/released.py), and a loaded checkpoint's step resumes (zb/checkpoint.py). Every later pipeline
of the model (another input signature, another Dynamo graph of it) keeps the cuts of its first, so that no rank's
stages read a tensor the rank released. A re-cut across ranks (zb/adapt.py) moves parameters to their new owner,
which gets storage again there; the old owner frees them here, and the model is re-cut once only.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from zb import checkpoint, plan_cache
from zb.autocast import no_autocast
from zb.core.options import Options
from zb.materialize import materialize
from zb.passes import Plan
from zb.runtime import PipelineRunner

log = logging.getLogger(__name__)

# Option release: per model (its root module), the cuts of its pipelines and the operations they cut between.
_CUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RECUT: weakref.WeakSet = weakref.WeakSet()  # models re-cut with option release (`ModelState.may_recut`)


class ModelState:
    """Keeps the models one compiled graph trains holding the tensors this process's stages read, and no others."""

    def __init__(self, options: Options, modules: list[torch.nn.Module]):
        self.options = options
        self.modules = modules
        self.model = modules[0] if modules else None  # the root module the cuts are kept for
        # The models this graph trains: their state_dict() on a pipeline rank holds only what the rank owns.
        for module in modules:
            checkpoint.guard(module)

    def keep_cuts(self) -> tuple | None:
        """(cuts, operations) every new plan of the model must cut at (option release), or None."""
        return _CUTS.get(self.model) if self.model is not None and self.options.release else None

    def ready(self, runner: PipelineRunner, plan: Plan, values: list[Any]) -> None:
        """Before a new runner's first step (`values`: its plan's inputs): give the deferred tensors values where
        they are held (with release, on their stages' rank), resume a loaded checkpoint, and free what other ranks
        own, the model keeping `plan`'s cuts from then on."""
        releasing = runner.distributed and self.options.release
        foreign = runner.foreign(values) if releasing else {}
        with no_autocast():
            held = {id(t) for m in self.modules for t in [*m.parameters(), *m.buffers()]} - set(foreign)
            materialize(self.modules, held, self.options.init, self.options.init_seed)
            checkpoint.resume(runner, values)
        if releasing:
            _release(runner, values, foreign)
            if self.model is not None and self.model not in _CUTS:
                _CUTS[self.model] = (plan.cuts, plan.operations)

    def recut_done(self, runner: PipelineRunner, values: list[Any], plan: Plan) -> None:
        """After a re-cut across ranks, with option release: free what this rank no longer reads (the parameters it
        sent to their new rank), and let every later plan of the model keep the new cuts."""
        if not (runner.distributed and self.options.release):
            return
        _release(runner, values, runner.foreign(values))
        if self.model is None:
            return
        _CUTS[self.model] = (plan.cuts, plan.operations)
        _RECUT.add(self.model)
        # Pipelines of the model built with the old cuts (other input signatures, other graphs) would read what this
        # rank just freed: they are dropped, and built again with the new cuts when called.
        for cache in plan_cache.caches_of(self.model):
            for key in [k for k, e in cache.entries.items() if e.plan.cuts != plan.cuts]:
                del cache.entries[key]

    def may_recut(self) -> bool:
        """Whether a re-cut may still happen: with option release, once per model (a second one, on another
        signature's times, would cut the model differently from pipelines that freed other tensors)."""
        return not (self.options.release and self.model is not None and self.model in _RECUT)


def _release(runner: PipelineRunner, values: Sequence[Any], foreign: dict[int, str]) -> None:
    freed = runner.release_foreign(values, foreign)
    if freed:
        log.info("zb: pipeline rank %d released %.1f MiB of parameters and buffers other ranks own (option "
                 "release=False keeps them)", runner.ranks[0], freed / 2**20)
