"""The facts analyze_batch tracks for each tensor (`Value`) and what a batch rule sees of one operation (`Ctx`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from zb.core import torch_internals

# A batch dim's layout: an int e (position r belongs to sample r // e), ("tiled", repeat, block) (sample
# (r % repeat) // block: the batch repeats along the dim), or None (unknown).
Layout = int | tuple | None


@dataclass(frozen=True, eq=False)
class Sort:
    """A sort of a 1-D batch-carrying tensor: the order in which mixture-of-experts routing groups its rows."""

    extent: int | None  # per-sample extent of the sorted dim before the sort
    size: int  # the sorted dim's length


@dataclass(frozen=True)
class Value:
    """What analyze_batch knows of one tensor (see analyze_batch's docstring)."""

    dims: dict[int, Layout] = field(default_factory=dict)  # batch dim -> its layout
    stat: bool = False  # computed from several samples
    uniform: frozenset[int] = frozenset()  # dims along which the values are constant (or random)
    # Routing: ("rows", Sort) rows in a sort's order; ("keys", Sort) the sorted keys themselves; ("index", Sort, k)
    # the sort's indices floor-divided by k; ("inverse", Sort) their inverse permutation; ("counts", Sort) and
    # ("offsets", Sort) the group sizes of the sorted keys and their cumulative sums; ("iota",) arange(n);
    # ("positional",) computed from an arange without the batch.
    route: tuple | None = None

    @property
    def facts(self) -> bool:
        return bool(self.dims or self.stat or self.route)


NONE = Value()


def fake_mode():
    """A fake-tensor mode whose shape environment allows data-dependent output shapes (nonzero, unique)."""
    return torch_internals.fake_mode_with_shape_env()


def tensors(x: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(x, lambda a: found.append(a) if isinstance(a, torch.Tensor) else None)
    return found


class Ctx:
    """One dispatched operation, as a rule sees it."""

    def __init__(self, run, func, args, kwargs, out):
        self.run, self.func, self.args, self.kwargs, self.out = run, func, args, kwargs, out
        self.outs = tensors(out)
        self.name = str(func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else func)
        self.micro = run.result.microbatch

    def v(self, t: Any) -> Value:
        return self.run.get(t) if isinstance(t, torch.Tensor) else NONE

    @property
    def schema(self) -> torch.FunctionSchema:
        """The operator's schema: its arguments (with their aliasing), returns and overload name."""
        return torch_internals.op_schema(self.func)

    @property
    def bound(self) -> dict[str, Any]:
        found = {}
        for i, arg in enumerate(self.schema.arguments):
            if i < len(self.args):
                found[arg.name] = self.args[i]
            elif arg.name in self.kwargs:
                found[arg.name] = self.kwargs[arg.name]
            else:
                found[arg.name] = arg.default_value if arg.has_default_value() else None
        return found

    def inputs(self) -> list[torch.Tensor]:
        return tensors((self.args, self.kwargs))

    def mix(self, why: str, kind: str = "other") -> list[Value]:
        self.run.mix(self.name, why, kind)
        return [Value(stat=True)] * len(self.outs)

    def each(self, value: Value) -> list[Value]:
        return [value] * len(self.outs)
