"""Which of the plan's parameters and buffers live on this process: those its pipeline ranks' stages read.

Before a step, every one of them must hold its values here; under torch.distributed the ones only other ranks'
stages read may be released (option release, runtime/released.py), and a checkpoint of this process holds the
ones its stages read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zb.codegen.program import InputSpec, Program
from zb.core.errors import ZbError
from zb.runtime.released import is_released, release


class StateOwnership:
    """Tells, for the parameters and buffers among a call's arguments (the plan's inputs), which this process's
    ranks read, which only other ranks read, and which no stage reads; checks the first kind are here."""

    def __init__(self, program: Program, placement: Sequence[int], ranks: Sequence[int]):
        self.program, self.placement, self.ranks = program, tuple(placement), set(ranks)

    def readers(self) -> list[tuple[InputSpec, set[int]]]:
        """Each parameter and buffer of the plan (its input spec) with the pipeline ranks whose stages read it."""
        readers = self.program.readers(self.placement)
        return [(s, readers.get(s.index, set())) for s in self.program.inputs if s.kind in ("parameter", "buffer")]

    def check_held(self, args: Sequence[Any]) -> None:
        """Every parameter and buffer this process's stages read must have its values here."""
        for spec, ranks in self.readers():
            if ranks & self.ranks and is_released(args[spec.index]):
                owner = getattr(args[spec.index], "_zb_owner", "another rank")
                raise ZbError(
                    f"{spec.kind} {spec.name!r} is read by this rank's stages, but its values are not on this "
                    f"process ({owner} holds it). Either a pipeline built for another input shape cut the model "
                    "elsewhere and this rank released it (use options={'release': False}, or fixed "
                    "'split_points'), or a model built on the meta device was not materialised (zb materialises "
                    "the models the compiled function reaches directly: compile the model or a function whose "
                    "arguments, closure or globals hold it)")

    def foreign(self, args: Sequence[Any]) -> dict[int, str]:
        """The parameters and buffers among `args` that only other pipeline ranks' stages read: id -> who holds it
        ("pipeline rank 1 (stage 1)")."""
        found = {}
        for spec, ranks in self.readers():
            if ranks and not ranks & self.ranks:
                stages = [s for s, stage in enumerate(self.program.stages) if spec.index in stage.reads]
                found[id(args[spec.index])] = (f"pipeline rank {min(ranks)} (stage{'s' if len(stages) > 1 else ''} "
                                               f"{', '.join(map(str, stages))})")
        return found

    def release_foreign(self, args: Sequence[Any], foreign: dict[int, str]) -> int:
        """Free the parameters and buffers `foreign` names (`foreign(args)`); returns the bytes freed. Tensors
        sharing storage with one this process reads stay."""
        state = [args[spec.index] for spec, _ in self.readers()]
        kept = {t.untyped_storage().data_ptr() for t in state if id(t) not in foreign and not is_released(t)}
        freed = 0
        for tensor in state:
            if id(tensor) not in foreign:
                continue
            if is_released(tensor):  # never materialised here (a meta-built model): say who holds it now
                tensor._zb_owner = foreign[id(tensor)]
            elif tensor.untyped_storage().data_ptr() not in kept:
                freed += release(tensor, foreign[id(tensor)])
        return freed

    def owned(self, state: dict[int, torch.Tensor]) -> tuple[set[int], set[int]]:
        """(ids of the tensors of `state` (input index -> the parameter or buffer of the last call) this process's
        stages read, ids of those no stage reads)."""
        mine, nobody = set(), set()
        for spec, ranks in self.readers():
            tensor = state.get(spec.index)
            if tensor is None:
                continue
            if not ranks:
                nobody.add(id(tensor))
            elif ranks & self.ranks:
                mine.add(id(tensor))
        return mine, nobody
