"""The batch rules analyze_batch applies to each aten operation: batch dims of the inputs -> batch dims of the
outputs, or "mixes samples". Local rules are data: `RULES` maps an aten overload packet to the function that
answers for it; ops without an entry go to DTensor's sharding propagation, then to an empirical check.

Every rule reads the facts (`Value`) of its tensor arguments and returns one `Value` per tensor output. A rule
never assumes: when it cannot show that an operation works within samples, it calls `ctx.mix(...)`, which records
the operation and marks its outputs as computed from several samples (`stat`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class Sort:
    """A sort of a 1-D batch-carrying tensor: the order in which mixture-of-experts routing groups its rows."""

    extent: int | None  # per-sample extent of the sorted dim before the sort
    size: int  # the sorted dim's length


@dataclass(frozen=True)
class Value:
    """What analyze_batch knows of one tensor (see analyze_batch's docstring)."""

    dims: dict[int, int | None] = field(default_factory=dict)  # batch dim -> per-sample extent (None: unknown)
    stat: bool = False  # computed from several samples
    uniform: frozenset[int] = frozenset()  # dims along which the values are constant (or random)
    # Routing: ("rows", Sort) rows in a sort's order; ("keys", Sort) the sorted keys themselves; ("index", Sort, k)
    # the sort's indices floor-divided by k; ("inverse", Sort) their inverse permutation; ("counts", Sort) and
    # ("offsets", Sort) the group sizes of the sorted keys and their cumulative sums; ("iota",) arange(n).
    route: tuple | None = None

    @property
    def facts(self) -> bool:
        return bool(self.dims or self.stat or self.route)


NONE = Value()


def fake_mode():
    """A fake-tensor mode whose shape environment allows data-dependent output shapes (nonzero, unique)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


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
    def bound(self) -> dict[str, Any]:
        found = {}
        for i, arg in enumerate(self.func._schema.arguments):
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


def apply(run, func, args, kwargs, out) -> None:
    ctx = Ctx(run, func, args, kwargs, out)
    if not ctx.outs:
        return
    ins = ctx.inputs()
    packet = func.overloadpacket
    if not any(ctx.v(t).facts or ctx.v(t).uniform for t in ins) and packet is not aten.expand:
        results = _no_facts(ctx, packet, ins)
    else:
        rule = RULES.get(packet)
        if rule is not None:
            run.result.rules["own"] += 1
            results = rule(ctx)
        elif torch.Tag.pointwise in func.tags:
            run.result.rules["own"] += 1
            results = pointwise(ctx)
        else:
            results = _fallback(ctx)
    for t, value in zip(ctx.outs, results):
        run.set(t, value)
    for i, arg in enumerate(func._schema.arguments):  # in-place: the mutated argument now holds the result
        if arg.alias_info is not None and arg.alias_info.is_write and i < len(args) and results:
            if isinstance(args[i], torch.Tensor):
                run.set(args[i], results[0])


def _no_facts(ctx: Ctx, packet, ins: list[torch.Tensor]) -> list[Value]:
    """No input carries the batch: the outputs do not either; note constant, random and arange values."""
    if packet in FILLED or packet in RANDOM:
        return [Value(uniform=frozenset(range(t.dim()))) for t in ctx.outs]
    if packet is aten.arange and ctx.outs[0].dim() == 1:
        bound = ctx.bound
        start, step = bound.get("start", 0), bound.get("step", 1)
        if packet is aten.arange and len(ctx.args) == 1:
            start, step = 0, 1
        if start in (0, None) and step in (1, None):
            return [Value(route=("iota",))]
    return [NONE] * len(ctx.outs)


# Elementwise --------------------------------------------------------------------------------------------------
def pointwise(ctx: Ctx, skip: int | None = None) -> list[Value]:
    """Broadcasting elementwise ops (and, with `skip`, ops elementwise in every dim but `skip`: cat)."""
    shape = ctx.outs[0].shape
    nd = len(shape)
    dims: dict[int, int | None] = {}
    stat = False
    routes: set = set()
    ins = [t for t in ctx.inputs() if t.dim() > 0 or ctx.v(t).facts]
    for t in ins:
        v = ctx.v(t)
        stat |= v.stat
        if v.route is not None and v.route[0] in ("rows", "keys"):
            routes.add(v.route[1])
        off = nd - t.dim()
        for d, extent in v.dims.items():
            od = d + off
            if od == skip:
                continue
            if t.shape[d] != shape[od]:
                return ctx.mix(f"broadcasts a batch dimension of size {t.shape[d]} to {shape[od]}")
            dims[od] = extent if od not in dims or dims[od] == extent else None
    for od in dims:
        for t in ins:
            v, d = ctx.v(t), od - (nd - t.dim())
            if d < 0 or d in v.dims or t.shape[d] == 1 or d in v.uniform:
                continue
            return ctx.mix(f"lines up a tensor of shape {list(t.shape)} that is not split into microbatches with "
                           f"batch dimension {od} (its values differ along it, as torch.arange(batch) would)")
        for t in ins:
            v = ctx.v(t)
            moved = v.route is not None and v.route[0] in ("rows", "keys")
            if routes and not moved and (od - (nd - t.dim())) in v.dims:
                return ctx.mix("combines rows grouped by a sort over the batch with rows in the batch's order")
    if len(routes) > 1:
        return ctx.mix("combines rows grouped by two different sorts over the batch")
    if stat and dims:
        return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
    uniform = frozenset(od for od in range(nd) if all(
        (od - (nd - t.dim())) < 0 or t.shape[od - (nd - t.dim())] == 1 or (od - (nd - t.dim())) in ctx.v(t).uniform
        for t in ins))
    route = _pointwise_route(ctx, ins, routes)
    return ctx.each(Value(dims, stat, uniform, route))


def _pointwise_route(ctx: Ctx, ins: list[torch.Tensor], routes: set) -> tuple | None:
    packet = ctx.func.overloadpacket
    first = ctx.v(ins[0]).route if ins else None
    if first is not None and len(ins) == 1:
        if packet in COPIES:
            return first
        divisor = _constant(ctx, 1) if packet is aten.floor_divide else None
        if first[0] == "index" and isinstance(divisor, int) and divisor > 0:
            return ("index", first[1], first[2] * divisor)
    if routes:
        return ("rows", next(iter(routes)))
    return None


def _constant(ctx: Ctx, position: int) -> Any:
    """The number at `position` of the op, also when dispatch wrapped it in a 0-dim tensor (read from the
    torch-level call that dispatched the op)."""
    value = ctx.args[position] if position < len(ctx.args) else None
    if isinstance(value, (int, float)) or value is None:
        return value
    node = ctx.run.current
    numbers = [a for a in (node.args if node is not None else ()) if isinstance(a, (int, float))
               and not isinstance(a, bool)]
    return numbers[0] if len(numbers) == 1 and value.dim() == 0 else None


def copy_(ctx: Ctx) -> list[Value]:
    """dst.copy_(src): dst takes src's values (broadcast)."""
    dst, src = ctx.args[0], ctx.args[1]
    merged = pointwise(ctx)
    if ctx.v(src).route is not None and dst.shape == src.shape:
        return ctx.each(replace(merged[0], route=ctx.v(src).route))
    return merged


def like(ctx: Ctx) -> list[Value]:
    """zeros_like / empty_like / rand_like: the input's shape (so its batch dims), constant or random values."""
    v = ctx.v(ctx.args[0])
    return ctx.each(Value(dims=dict(v.dims), uniform=frozenset(range(ctx.outs[0].dim()))))


def new_filled(ctx: Ctx) -> list[Value]:
    """x.new_zeros(size) and friends: a new tensor of the given size, constant."""
    return ctx.each(Value(uniform=frozenset(range(ctx.outs[0].dim()))))


def fill(ctx: Ctx) -> list[Value]:
    """In-place fill/zero/random: the tensor keeps its batch dims, its values become constant or random."""
    v = ctx.v(ctx.args[0])
    if len(ctx.inputs()) > 1 and any(ctx.v(t).facts for t in ctx.inputs()[1:]):
        return pointwise(ctx)
    return ctx.each(Value(dims=dict(v.dims), uniform=frozenset(range(ctx.outs[0].dim()))))


# Views --------------------------------------------------------------------------------------------------------
def view(ctx: Ctx) -> list[Value]:
    src, out = ctx.args[0], ctx.outs[0]
    v = ctx.v(src)
    dims, why = view_dims(tuple(src.shape), tuple(out.shape), v.dims, ctx.micro)
    if why:
        return ctx.mix(why)
    uniform = frozenset(range(out.dim())) if len(v.uniform) == src.dim() else frozenset()
    route = v.route
    if route is not None and route[0] != "iota" and (len(v.dims) != 1 or len(dims) != 1):
        return ctx.mix("reshapes rows grouped by a sort over the batch")
    if route == ("iota",) and sum(s != 1 for s in out.shape) > 1:
        route = None
    return ctx.each(Value(dims, v.stat, uniform, route))


def view_dims(src: tuple, out: tuple, dims: dict[int, int | None], micro: int
              ) -> tuple[dict[int, int | None], str | None]:
    """Batch dims of a reshape from `src` to `out`. Dims are grouped where their products meet; a batch dim that is
    the outermost non-singleton dim of its group stays outermost in the merged block (per-sample extent times the
    inner sizes), and the out dims of the block that cross a sample's block carry it."""
    if not dims:
        return {}, None
    if 0 in src or 0 in out:
        return {o: None for o, s in enumerate(out) if s != 1}, None
    result: dict[int, int | None] = {}
    i = j = 0
    while i < len(src) or j < len(out):
        gi, go = [], []
        pi = pj = 1
        if i < len(src):
            gi.append(i)
            pi *= src[i]
            i += 1
        if j < len(out):
            go.append(j)
            pj *= out[j]
            j += 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                go.append(j)
                pj *= out[j]
                j += 1
        batch = [d for d in gi if d in dims]
        if not batch:
            continue
        block = None
        if len(batch) == 1 and dims[batch[0]] is not None and all(src[d] == 1 for d in gi if d < batch[0]):
            d = batch[0]
            block = dims[d] * math.prod(src[e] for e in gi if e > d)  # one sample's positions in the group
        if block is None:
            for o in go:
                if out[o] != 1:
                    result[o] = None
            continue
        carrying = []
        for k, o in enumerate(go):
            stride = math.prod(out[e] for e in go[k + 1:])
            span = stride * out[o]
            if out[o] != 1 and (block % span != 0 or (micro == 1 and not carrying and span == pi)):
                carrying.append((o, stride))
        if not carrying:
            return {}, "reshapes the batch dimension away (a microbatch of one sample would lose it)"
        for o, stride in carrying:
            result[o] = block // stride if len(carrying) == 1 and block % stride == 0 else None
    return result, None


def expand(ctx: Ctx) -> list[Value]:
    src, out = ctx.args[0], ctx.outs[0]
    v = ctx.v(src)
    off = out.dim() - src.dim()
    dims = {}
    for d, extent in v.dims.items():
        if src.shape[d] != out.shape[d + off]:
            return ctx.mix(f"expands a batch dimension of size {src.shape[d]} to {out.shape[d + off]}")
        dims[d + off] = extent
    uniform = {d + off for d in v.uniform} | set(range(off))
    uniform |= {d + off for d in range(src.dim()) if src.shape[d] == 1 and out.shape[d + off] != 1}
    return ctx.each(Value(dims, v.stat, frozenset(uniform), v.route))


def _remap(v: Value, mapping: dict[int, int]) -> Value:
    return Value({mapping[d]: e for d, e in v.dims.items() if d in mapping}, v.stat,
                 frozenset(mapping[d] for d in v.uniform if d in mapping), v.route)


def permute(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    order = [d % src.dim() for d in ctx.args[1]]
    return ctx.each(_remap(ctx.v(src), {old: new for new, old in enumerate(order)}))


def transpose(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    n = max(src.dim(), 1)
    if ctx.func.overloadpacket is aten.t:
        a, b = 0, min(1, src.dim() - 1)
    else:
        a, b = ctx.args[1] % n, ctx.args[2] % n
    mapping = {d: d for d in range(src.dim())}
    mapping[a], mapping[b] = b, a
    return ctx.each(_remap(ctx.v(src), mapping))


def unsqueeze(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    at = ctx.args[1] % (src.dim() + 1)
    mapping = {d: d + (d >= at) for d in range(src.dim())}
    value = _remap(ctx.v(src), mapping)
    return ctx.each(replace(value, uniform=value.uniform | {at}))


def squeeze(ctx: Ctx) -> list[Value]:
    src, out = ctx.args[0], ctx.outs[0]
    v = ctx.v(src)
    if len(ctx.args) > 1:
        asked = ctx.args[1] if isinstance(ctx.args[1], (list, tuple)) else [ctx.args[1]]
        gone = {d % max(src.dim(), 1) for d in asked if src.shape[d] == 1}
    else:
        gone = {d for d in range(src.dim()) if src.shape[d] == 1}
    if gone & set(v.dims):
        return ctx.mix("squeezes away a batch dimension (a microbatch of one sample)")
    kept = [d for d in range(src.dim()) if d not in gone]
    assert len(kept) == out.dim()
    return ctx.each(_remap(v, {d: k for k, d in enumerate(kept)}))


def slice_(ctx: Ctx) -> list[Value]:
    b = ctx.bound
    src = b["self"]
    dim = b["dim"] % max(src.dim(), 1)
    v = ctx.v(src)
    whole = ctx.outs[0].shape[dim] == src.shape[dim] and b.get("step", 1) in (1, None)
    if dim in v.dims and not whole:
        return ctx.mix("slices a batch dimension (picks samples by their position in the batch)")
    return ctx.each(v if whole else replace(v, route=None if v.route == ("iota",) else v.route))


def select(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    dim = ctx.args[1] % src.dim()
    v = ctx.v(src)
    if dim in v.dims:
        return ctx.mix("selects one position of a batch dimension (one sample by its position in the batch)")
    kept = [d for d in range(src.dim()) if d != dim]
    return ctx.each(_remap(v, {d: k for k, d in enumerate(kept)}))


def split(ctx: Ctx) -> list[Value]:
    b = ctx.bound
    src = b["self"]
    dim = b["dim"] % max(src.dim(), 1)
    v = ctx.v(src)
    if dim in v.dims and len(ctx.outs) > 1:
        return ctx.mix("splits a batch dimension into pieces (groups samples by their position in the batch)")
    if ctx.func.overloadpacket is aten.unbind:
        kept = [d for d in range(src.dim()) if d != dim]
        return ctx.each(_remap(v, {d: k for k, d in enumerate(kept)}))
    return ctx.each(v)


def alias(ctx: Ctx) -> list[Value]:
    return ctx.each(ctx.v(ctx.args[0]))


# Reductions and operations along a dimension --------------------------------------------------------------------
def _dims_arg(value: Any, ndim: int) -> list[int]:
    if value is None:
        return list(range(ndim))
    if isinstance(value, int):
        value = [value]
    value = list(value)
    return [d % max(ndim, 1) for d in value] if value else list(range(ndim))


def reduction(ctx: Ctx) -> list[Value]:
    b = ctx.bound
    src = b.get("self", b.get("input"))
    v = ctx.v(src)
    reduced = _dims_arg(b.get("dim"), src.dim()) if "dim" in b else list(range(src.dim()))
    keep = bool(b.get("keepdim"))
    if set(reduced) & set(v.dims):
        return ctx.mix(f"computes {ctx.name} over a batch dimension", "reduction")
    if keep:
        mapping = {d: d for d in range(src.dim())}
    else:
        kept = [d for d in range(src.dim()) if d not in reduced]
        mapping = {d: k for k, d in enumerate(kept)}
    route = v.route if v.route is not None and v.route[0] == "rows" else None
    out = _remap(replace(v, route=route, uniform=v.uniform - set(reduced)), mapping)
    return [out if t.dim() == ctx.outs[0].dim() else replace(out, uniform=frozenset()) for t in ctx.outs]


def along(ctx: Ctx) -> list[Value]:
    """Ops that work along one dim (softmax, cumsum, sort, topk, flip, roll, tril...): per sample unless that dim
    carries the batch; a 1-D sort over the batch is the grouping step of mixture-of-experts routing."""
    b = ctx.bound
    src = b.get("self", b.get("input"))
    v = ctx.v(src)
    packet = ctx.func.overloadpacket
    if packet in (aten.tril, aten.triu):
        worked = {src.dim() - 2, src.dim() - 1}
    elif packet is aten.flip:
        worked = set(_dims_arg(b["dims"], src.dim()))
    elif packet is aten.roll:
        worked = set(_dims_arg(b.get("dims") or None, src.dim()))
    else:
        worked = set(_dims_arg(b.get("dim", -1), src.dim()))
    if worked & set(v.dims):
        if packet in (aten.sort, aten.argsort) and src.dim() == 1 and v.route is None and not v.stat:
            order = Sort(v.dims[0], src.shape[0])
            ctx.run.result.rules["routing"] += 1
            found = [Value({0: None}, route=("keys", order)), Value({0: None}, route=("index", order, 1))]
            return found if packet is aten.sort else [found[1]]
        return ctx.mix(f"computes {ctx.name} along a batch dimension")
    if packet is aten.cumsum and v.route is not None and v.route[0] == "counts":
        return ctx.each(replace(v, route=("offsets", v.route[1])))
    route = v.route if v.route is not None and v.route[0] == "rows" else None
    uniform = v.uniform - worked if packet not in (aten.sort, aten.argsort, aten.topk) else frozenset()
    return ctx.each(Value(dict(v.dims), v.stat, uniform, route))


def cat(ctx: Ctx) -> list[Value]:
    parts = [t for t in ctx.args[0] if t.numel() > 0 or t.dim() > 1]
    dim = ctx.bound.get("dim", 0) % ctx.outs[0].dim()
    if any(dim in ctx.v(t).dims for t in parts):
        return ctx.mix("concatenates along a batch dimension (joins samples end to end)")
    return pointwise(ctx, skip=dim)


def counts(ctx: Ctx) -> list[Value]:
    """histc / bincount: tokens per group. Of the sorted keys of a routing sort: that sort's group sizes."""
    v = ctx.v(ctx.args[0])
    if v.route is not None and v.route[0] == "keys":
        ctx.run.result.rules["routing"] += 1
        return ctx.each(Value(stat=True, route=("counts", v.route[1])))
    if v.dims:
        return ctx.mix(f"counts values over the batch ({ctx.name})")
    return ctx.each(Value(stat=v.stat))


def data_dependent(ctx: Ctx) -> list[Value]:
    """nonzero, unique, masked_select, item: their shape or value depends on the batch's data."""
    if any(ctx.v(t).dims for t in ctx.inputs()):
        return ctx.mix(f"computes {ctx.name} of a batched value (its result depends on every sample's data)")
    return ctx.each(Value(stat=any(ctx.v(t).stat for t in ctx.inputs())))


# Contractions ---------------------------------------------------------------------------------------------------
def _contract(ctx: Ctx, a: torch.Tensor, b: torch.Tensor, a_map: dict[int, int | None],
              b_map: dict[int, int | None], shared: list[tuple[int, int, int]]) -> Value | None:
    """Out dims of a contraction: a_map / b_map send each input dim to its out dim (None: summed over); `shared`
    lists (a dim, b dim, out dim) that are batch-of-matrices dims. Returns None after recording a mix."""
    va, vb = ctx.v(a), ctx.v(b)
    for v, mapping, name in ((va, a_map, "first"), (vb, b_map, "second")):
        for d in v.dims:
            if mapping.get(d) is None and not any(d == (s[0] if name == "first" else s[1]) for s in shared):
                ctx.mix(f"sums over a batch dimension of its {name} operand ({ctx.name})", "reduction")
                return None
    dims: dict[int, int | None] = {}
    for ad, bd, od in shared:
        if ad in va.dims or bd in vb.dims:
            for t, v, d in ((a, va, ad), (b, vb, bd)):
                if d not in v.dims and t.shape[d] != 1 and d not in v.uniform:
                    ctx.mix(f"pairs each sample with a matrix not split into microbatches ({ctx.name})")
                    return None
            dims[od] = va.dims.get(ad, vb.dims.get(bd))
    a_out = {a_map[d] for d in va.dims if a_map.get(d) is not None}
    b_out = {b_map[d] for d in vb.dims if b_map.get(d) is not None}
    if a_out and b_out:
        ctx.mix(f"pairs samples with samples (a {ctx.name} of two batched operands)")
        return None
    for d in va.dims:
        if a_map.get(d) is not None:
            dims[a_map[d]] = va.dims[d]
    for d in vb.dims:
        if b_map.get(d) is not None:
            dims[b_map[d]] = vb.dims[d]
    stat = va.stat or vb.stat
    if stat and dims:
        ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
        return None
    route = va.route if va.route is not None and va.route[0] == "rows" else None
    if vb.route is not None and vb.route[0] in ("rows", "keys"):
        ctx.mix(f"takes rows grouped by a sort over the batch as the second operand of {ctx.name}")
        return None
    return Value(dims, stat, frozenset(), route)


def mm(ctx: Ctx) -> list[Value]:
    packet = ctx.func.overloadpacket
    if packet in (aten.addmm, aten.addmv, aten.baddbmm, aten.addbmm):
        bias, a, b = ctx.args[0], ctx.args[1], ctx.args[2]
    else:
        bias, (a, b) = None, ctx.args[:2]
    if packet in (aten.mm, aten.addmm):
        value = _contract(ctx, a, b, {0: 0, 1: None}, {0: None, 1: 1}, [])
    elif packet in (aten.mv, aten.addmv):
        value = _contract(ctx, a, b, {0: 0, 1: None}, {0: None}, [])
    elif packet is aten.dot:
        value = _contract(ctx, a, b, {0: None}, {0: None}, [])
    elif packet is aten.addbmm:
        value = _contract(ctx, a, b, {0: None, 1: 0, 2: None}, {0: None, 1: None, 2: 1}, [])
    else:  # bmm, baddbmm
        value = _contract(ctx, a, b, {1: 1, 2: None}, {1: None, 2: 2}, [(0, 0, 0)])
    if value is None:
        return [Value(stat=True)] * len(ctx.outs)
    if bias is not None and ctx.v(bias).facts:
        return _merge_bias(ctx, value, bias)
    return ctx.each(value)


def _merge_bias(ctx: Ctx, value: Value, bias: torch.Tensor) -> list[Value]:
    out = ctx.outs[0]
    vb = ctx.v(bias)
    off = out.dim() - bias.dim()
    dims = dict(value.dims)
    for d, extent in vb.dims.items():
        if bias.shape[d] != out.shape[d + off]:
            return ctx.mix(f"broadcasts a batch dimension of size {bias.shape[d]}")
        dims[d + off] = extent
    if (vb.stat or value.stat) and dims:
        return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
    return ctx.each(Value(dims, vb.stat or value.stat, frozenset(), value.route))


def grouped_mm(ctx: Ctx) -> list[Value]:
    """torch._grouped_mm(x, w, offs) (and transformers' fallback op): row i of x times the weight of the group
    that `offs` puts it in. Per sample when x's rows are in the order of a routing sort over the batch and offs
    are that sort's cumulative group sizes: each row then meets the weight of its own key (its expert)."""
    b = ctx.bound
    x = b.get("self", b.get("input", ctx.args[0]))
    w = b.get("mat2", b.get("weight", ctx.args[1]))
    offs = b.get("offs")
    vx, vw, vo = ctx.v(x), ctx.v(w), ctx.v(offs)
    if vw.facts:
        return ctx.mix(f"multiplies by batched expert weights ({ctx.name})")
    if not vx.facts:
        return ctx.each(NONE)
    if vx.route is None or vx.route[0] not in ("rows", "keys") or vo.route != ("offsets", vx.route[1]):
        return ctx.mix(f"groups batched rows (with {ctx.name}) by offsets that are not the cumulative group sizes of "
                       "the sort that ordered those rows")
    ctx.run.result.rules["routing"] += 1
    return ctx.each(Value(dict(vx.dims), False, frozenset(), ("rows", vx.route[1])))


def convolution(ctx: Ctx) -> list[Value]:
    x, w = ctx.args[0], ctx.args[1]
    vx = ctx.v(x)
    if ctx.v(w).facts or (len(ctx.args) > 2 and ctx.v(ctx.args[2]).facts):
        return ctx.mix("convolves with batched weights")
    if set(vx.dims) - {0}:
        return ctx.mix("convolves over a dimension that carries the batch")
    if vx.stat and vx.dims:
        return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
    return ctx.each(Value(dict(vx.dims), vx.stat))


# Normalisation, embedding, losses, attention ----------------------------------------------------------------------
def layer_norm(ctx: Ctx) -> list[Value]:
    b = ctx.bound
    x = b["input"]
    normalized = len(b["normalized_shape"])
    v = ctx.v(x)
    if any(d >= x.dim() - normalized for d in v.dims):
        return ctx.mix(f"normalises over a batch dimension ({ctx.name})")
    for t in (b.get("weight"), b.get("bias")):
        if isinstance(t, torch.Tensor) and ctx.v(t).facts:
            return ctx.mix(f"normalises with batched weights ({ctx.name})")
    if v.stat and v.dims:
        return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
    return [Value(dict(v.dims), v.stat) for _ in ctx.outs]


def group_norm(ctx: Ctx) -> list[Value]:
    v = ctx.v(ctx.args[0])
    if set(v.dims) - {0} or any(ctx.v(t).facts for t in ctx.args[1:3] if isinstance(t, torch.Tensor)):
        return ctx.mix("normalises groups over a dimension that carries the batch (group_norm)")
    return ctx.each(Value(dict(v.dims), v.stat))


def batch_norm(ctx: Ctx) -> list[Value]:
    b = ctx.bound
    v = ctx.v(b["input"])
    training = b.get("training", ctx.func.overloadpacket is not aten._native_batch_norm_legit_no_training)
    if ctx.func.overloadpacket is aten._native_batch_norm_legit_no_training:
        training = False
    if training and v.dims:
        return ctx.mix("is batch normalisation in training mode: it normalises with the statistics of the batch "
                       "(use LayerNorm/GroupNorm, or put the module in eval mode)")
    if 1 in v.dims:
        return ctx.mix("normalises per channel over a channel dimension that carries the batch")
    return [Value(dict(v.dims), v.stat) if t.shape == b["input"].shape else NONE for t in ctx.outs]


def embedding(ctx: Ctx) -> list[Value]:
    weight, indices = ctx.args[0], ctx.args[1]
    if ctx.v(weight).facts:
        return ctx.mix("looks up a batched embedding table")
    v = ctx.v(indices)
    return ctx.each(Value(dict(v.dims), v.stat, v.uniform))


def loss(ctx: Ctx) -> list[Value]:
    """nll_loss / mse_loss / ...: elementwise over the samples, then reduced (reduction 1 = mean, 2 = sum)."""
    b = ctx.bound
    reduction = b.get("reduction", 1)
    x = b.get("self", b.get("input"))
    target = b.get("target")
    if ctx.func.overloadpacket in (aten.nll_loss_forward, aten.nll_loss2d_forward):
        vx, vt = ctx.v(x), ctx.v(target)
        class_dim = 1 if x.dim() > 1 else 0
        if class_dim in vx.dims:
            return ctx.mix("takes nll_loss over a class dimension that carries the batch")
        kept = [d for d in range(x.dim()) if d != class_dim]
        dims = {kept.index(d): e for d, e in vx.dims.items()}
        dims.update(vt.dims)
        per_sample = Value(dims, vx.stat or vt.stat)
    else:
        per_sample = pointwise(ctx)[0] if reduction == 0 else _elementwise_inputs(ctx)
    if per_sample.stat and per_sample.dims:
        return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
    if reduction == 0:
        return ctx.each(per_sample)
    if per_sample.dims:
        return ctx.mix(f"reduces {ctx.name} over the batch", "reduction")
    return ctx.each(Value(stat=per_sample.stat))


def _elementwise_inputs(ctx: Ctx) -> Value:
    dims: dict[int, int | None] = {}
    for t in ctx.inputs():
        dims.update(ctx.v(t).dims)
    return Value(dims, any(ctx.v(t).stat for t in ctx.inputs()))


def attention(ctx: Ctx) -> list[Value]:
    """Scaled dot-product attention over [..., L, E]: per sample when the batch is in the leading dims of q, k,
    v (and of the mask, aligned with the scores [..., L, S])."""
    q, k, v = ctx.args[:3]
    b = ctx.bound
    mask = next((b[n] for n in ("attn_mask", "attn_bias", "bias") if isinstance(b.get(n), torch.Tensor)), None)
    lead = q.dim() - 2
    dims: dict[int, int | None] = {}
    for t in (q, k, v):
        vt = ctx.v(t)
        if any(d >= lead for d in vt.dims):
            return ctx.mix("attends over a sequence or feature dimension that carries the batch")
        if vt.stat and vt.dims:
            return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
        dims.update({d + lead - (t.dim() - 2): e for d, e in vt.dims.items()})
    for t in (q, k, v):
        vt = ctx.v(t)
        off = lead - (t.dim() - 2)
        for od in dims:
            d = od - off
            if 0 <= d < t.dim() - 2 and d not in vt.dims and t.shape[d] != 1 and d not in vt.uniform:
                return ctx.mix("attends between samples and keys/values not split into microbatches")
    if mask is not None:
        vm = ctx.v(mask)
        off = q.dim() - mask.dim()
        if any(d + off >= lead for d in vm.dims) or (vm.stat and vm.dims):
            return ctx.mix("attends with a mask that carries the batch along its sequence dimensions")
        for od in dims:
            d = od - off
            if 0 <= d and d not in vm.dims and mask.shape[d] != 1 and d not in vm.uniform:
                return ctx.mix("attends with a mask not split into microbatches along a batch dimension")
    results = []
    for t in ctx.outs:
        results.append(Value({d: e for d, e in dims.items() if d < t.dim() and t.shape[d] == q.shape[d]}))
    return results


# Indexing -------------------------------------------------------------------------------------------------------
def index(ctx: Ctx) -> list[Value]:
    """x[i0, i1, ...] (advanced indexing): gathering along a batch dim picks samples by position, unless the index
    is arange (every position in order) or undoes / follows a routing sort of those very rows."""
    src, indices = ctx.args[0], list(ctx.args[1])
    vs = ctx.v(src)
    indexed = [d for d, i in enumerate(indices) if i is not None]
    index_tensors = [indices[d] for d in indexed]
    index_shape = torch.broadcast_shapes(*(t.shape for t in index_tensors))
    n_index = len(index_shape)
    contiguous = indexed == list(range(indexed[0], indexed[-1] + 1))
    first = indexed[0] if contiguous else 0
    dims: dict[int, int | None] = {}
    route = None
    for d, extent in vs.dims.items():
        if d in indexed:
            continue
        o = d if d < first else d - len(indexed) + n_index
        if not contiguous:
            o = n_index + [e for e in range(src.dim()) if e not in indexed].index(d)
        dims[o] = extent
    for d in indexed:
        t = indices[d]
        vi = ctx.v(t)
        if d in vs.dims:
            if len(indexed) == 1 and vi.route is not None and vi.route[0] == "inverse" and vs.route is not None \
                    and vs.route[0] in ("rows", "keys") and vs.route[1] is vi.route[1]:
                ctx.run.result.rules["routing"] += 1
                dims[first] = vi.route[1].extent
                continue
            if len(indexed) == 1 and vi.route is not None and vi.route[0] == "index" and vs.route is None \
                    and src.shape[d] * vi.route[2] == vi.route[1].size and t.dim() == 1:
                ctx.run.result.rules["routing"] += 1
                dims[first] = None
                route = ("rows", vi.route[1])
                continue
            if vi.route == ("iota",) and t.numel() == src.shape[d] and not vi.dims:
                at = first + n_index - 1 - next(k for k, s in enumerate(reversed(t.shape)) if s != 1) \
                    if t.numel() > 1 else first + n_index - 1
                dims[at] = vs.dims[d]
                continue
            return ctx.mix("indexes along a batch dimension (picks samples by their position in the batch)")
        off = n_index - t.dim()
        for e, extent in vi.dims.items():
            dims[first + e + off] = extent
        if vi.route is not None and vi.route[0] in ("rows", "keys", "index"):
            route = ("rows", vi.route[1])
    if vs.stat and dims or any(ctx.v(t).stat for t in index_tensors) and dims:
        return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
    if vs.route is not None and vs.route[0] in ("rows", "keys") and route is None and not \
            any(ctx.v(t).route is not None and ctx.v(t).route[0] == "inverse" for t in index_tensors):
        route = ("rows", vs.route[1])
    return ctx.each(Value(dims, vs.stat, _index_uniform(ctx, src, indices, index_shape, first, contiguous), route))


def _index_uniform(ctx: Ctx, src: torch.Tensor, indices: list, index_shape, first: int, contiguous: bool
                   ) -> frozenset[int]:
    """Output dims of x[i0, ...] along which the values are constant: a non-indexed dim along which x is, and an
    index position where every index tensor is constant, or picks along a dim of x that is constant."""
    vs = ctx.v(src)
    indexed = [d for d, i in enumerate(indices) if i is not None]
    n_index = len(index_shape)
    uniform = set()
    rest = [d for d in range(src.dim()) if d not in indexed]
    for k, d in enumerate(rest):
        if d in vs.uniform:
            uniform.add((d if d < first else d - len(indexed) + n_index) if contiguous else n_index + k)
    base = first if contiguous else 0
    for p in range(n_index):
        varies = False
        for d in indexed:
            t = indices[d]
            e = p - (n_index - t.dim())
            if e >= 0 and t.shape[e] != 1 and e not in ctx.v(t).uniform and d not in vs.uniform:
                varies = True
        if not varies:
            uniform.add(base + p)
    return frozenset(uniform)


def index_select(ctx: Ctx) -> list[Value]:
    src, dim, idx = ctx.args[0], ctx.args[1] % max(ctx.args[0].dim(), 1), ctx.args[2]
    vs, vi = ctx.v(src), ctx.v(idx)
    if dim in vs.dims:
        return ctx.mix("selects along a batch dimension with index_select (picks samples by their position in "
                       "the batch)")
    dims = {d: e for d, e in vs.dims.items()}
    if vi.dims:
        dims[dim] = vi.dims.get(0)
    if (vs.stat or vi.stat) and dims:
        return ctx.mix("computes a per-sample value from a statistic over the batch", "statistic")
    return ctx.each(Value(dims, vs.stat or vi.stat))


def gather(ctx: Ctx) -> list[Value]:
    src, dim = ctx.args[0], ctx.args[1] % max(ctx.args[0].dim(), 1)
    if dim in ctx.v(src).dims:
        return ctx.mix("gathers along a batch dimension (picks samples by their position in the batch)")
    return pointwise(ctx, skip=dim)


def scatter(ctx: Ctx) -> list[Value]:
    b = ctx.bound
    src = b["self"]
    dim = b["dim"] % max(src.dim(), 1)
    if any(dim in ctx.v(t).dims for t in ctx.inputs()):
        return ctx.mix(f"computes {ctx.name} along a batch dimension (writes samples into each other's positions)")
    return pointwise(ctx, skip=dim)


def index_put(ctx: Ctx) -> list[Value]:
    """x[i0, ...] = values. The inverse of a routing sort (`inv[perm] = arange(n)`) is recognised; writing along a
    batch dim, or writing batched rows into a tensor not split into microbatches, mixes samples."""
    src, indices, values = ctx.args[0], list(ctx.args[1]), ctx.args[2]
    vs, vv = ctx.v(src), ctx.v(values)
    indexed = [d for d, i in enumerate(indices) if i is not None]
    vi = [ctx.v(indices[d]) for d in indexed]
    if len(indexed) == 1 and src.dim() == 1 and vi[0].route is not None and vi[0].route[0] == "index" \
            and vi[0].route[2] == 1 and vv.route == ("iota",) and values.numel() == src.numel():
        ctx.run.result.rules["routing"] += 1
        return ctx.each(Value({0: None}, route=("inverse", vi[0].route[1])))
    if any(d in vs.dims for d in indexed) or any(v.facts for v in vi):
        return ctx.mix("writes by index along a batch dimension (or by batched indices)")
    merged = pointwise(ctx)
    return merged


def index_add(ctx: Ctx) -> list[Value]:
    src, dim = ctx.args[0], ctx.args[1] % max(ctx.args[0].dim(), 1)
    if dim in ctx.v(src).dims or any(ctx.v(t).dims for t in ctx.inputs()[1:2]):
        return ctx.mix(f"computes {ctx.name} along a batch dimension")
    return pointwise(ctx, skip=dim)


def repeat_interleave(ctx: Ctx) -> list[Value]:
    b = ctx.bound
    src = b.get("self", b.get("input"))
    if not isinstance(src, torch.Tensor) or ctx.func._overloadname == "Tensor":
        return ctx.mix("repeats positions by per-position counts (repeat_interleave with tensor repeats)")
    v = ctx.v(src)
    dim = b.get("dim")
    if dim is None:
        return ctx.mix("repeats positions of the flattened batch (repeat_interleave)") if v.dims else ctx.each(NONE)
    dim = dim % src.dim()
    if isinstance(b.get("repeats"), torch.Tensor) and dim in v.dims:
        return ctx.mix("repeats positions along a batch dimension by tensor counts (repeat_interleave)")
    return ctx.each(Value({d: (e * ctx.outs[0].shape[d] // src.shape[d] if e is not None and d == dim else e)
                           for d, e in v.dims.items()}, v.stat))


def repeat(ctx: Ctx) -> list[Value]:
    src, times = ctx.args[0], list(ctx.args[1])
    v = ctx.v(src)
    off = len(times) - src.dim()
    if any(times[d + off] != 1 for d in v.dims):
        return ctx.mix("repeats (tiles) a batch dimension: copies of all samples end to end")
    return ctx.each(_remap(v, {d: d + off for d in range(src.dim())}))


def pad(ctx: Ctx) -> list[Value]:
    src, widths = ctx.args[0], list(ctx.args[1])
    v = ctx.v(src)
    padded = {src.dim() - 1 - k // 2 for k, w in enumerate(widths) if w}
    if padded & set(v.dims):
        return ctx.mix("pads a batch dimension")
    return ctx.each(Value(dict(v.dims), v.stat, frozenset(), None))


# Without a local rule: DTensor's sharding propagation, then an empirical check -----------------------------------
def _fallback(ctx: Ctx) -> list[Value]:
    found = _dtensor(ctx)
    if found is not None:
        ctx.run.result.rules["dtensor"] += 1
        return found
    found = _empirical(ctx)
    if found is not None:
        ctx.run.result.rules["empirical"] += 1
        return found
    return ctx.mix(f"calls {ctx.name}, which has no batch rule (zb's or DTensor's) and could not be checked on random "
                   "data; register one with zb.passes.batch_rules.register")


def _single_batch_dims(ctx: Ctx) -> dict[int, int] | None:
    """Per tensor input, its one batch dim; None when some input has several, a statistic or a route."""
    found = {}
    for t in ctx.inputs():
        v = ctx.v(t)
        if v.stat or v.route is not None or len(v.dims) > 1:
            return None
        if v.dims:
            found[id(t)] = next(iter(v.dims))
    return found


def _dtensor(ctx: Ctx) -> list[Value] | None:
    from zb.passes import dtensor_rules

    if ctx.func.namespace != "aten":
        return None
    shard = _single_batch_dims(ctx)
    if shard is None:
        return None
    answer = dtensor_rules.propagate(ctx.func, ctx.args, ctx.kwargs, shard)
    if answer is None:
        return None
    if answer == "redistribute":
        return ctx.mix(f"computes {ctx.name}, which needs the whole batch (DTensor's rule redistributes it)")
    if answer == "partial":
        return ctx.mix(f"reduces over the batch ({ctx.name}: DTensor's rule gives a partial result)", "reduction")
    if None in answer:
        return ctx.mix(f"drops the batch dimension ({ctx.name}: DTensor's rule replicates its result)")
    return [Value({d: None}) for d in answer]


def _empirical(ctx: Ctx) -> list[Value] | None:
    """Run the op on random data: two microbatches joined along their batch dims, and each alone; per sample when
    the joined result is the two results joined along one output dim."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    shard = _single_batch_dims(ctx)
    if shard is None or ctx.func.is_view or any(a.alias_info is not None and a.alias_info.is_write
                                                  for a in ctx.func._schema.arguments):
        return None
    if any(not (t.dtype.is_floating_point or t.dtype == torch.bool) and id(t) in shard for t in ctx.inputs()):
        return None
    generator = torch.Generator().manual_seed(0)

    def real(t: torch.Tensor) -> torch.Tensor:
        shape = [int(s) for s in t.shape]
        if t.dtype.is_floating_point:
            return torch.randn(shape, generator=generator).to(t.dtype)
        if t.dtype == torch.bool:
            return torch.rand(shape, generator=generator) > 0.5
        return torch.zeros(shape, dtype=t.dtype)

    with unset_fake_temporarily():
        try:
            one = fx.node.map_aggregate((ctx.args, ctx.kwargs), lambda a: real(a) if isinstance(a, torch.Tensor) else a)
            two = fx.node.map_aggregate((ctx.args, ctx.kwargs), lambda a: real(a) if isinstance(a, torch.Tensor) else a)
            flat_fake, flat_one, flat_two = ctx.inputs(), tensors(one), tensors(two)
            joined_of = {id(o): (torch.cat([o, w], shard[id(f)]) if id(f) in shard else o)
                         for f, o, w in zip(flat_fake, flat_one, flat_two)}
            shared = {id(w): o for f, o, w in zip(flat_fake, flat_one, flat_two) if id(f) not in shard}
            two = fx.node.map_aggregate(two, lambda a: shared.get(id(a), a) if isinstance(a, torch.Tensor) else a)
            joined = fx.node.map_aggregate(one, lambda a: joined_of.get(id(a), a) if isinstance(a, torch.Tensor)
                                           else a)
            outs = [tensors(ctx.func(*args, **kwargs)) for args, kwargs in (one, two, joined)]
        except Exception:
            return None
    results = []
    for a, b, j in zip(*outs):
        grown = [d for d in range(j.dim()) if a.dim() == j.dim() and j.shape[d] == a.shape[d] + b.shape[d]
                 and a.shape[d] > 0]
        ok = [d for d in grown if torch.allclose(torch.cat([a, b], d), j, rtol=1e-5, atol=1e-6, equal_nan=True)]
        if not ok:
            return ctx.mix(f"calls {ctx.name} (no batch rule), which gives another result on two microbatches "
                           "joined than on each alone (checked on random data)")
        results.append(Value({ok[0]: None}))
    return results


# The rule table ---------------------------------------------------------------------------------------------------
def _packets(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


FILLED = set(_packets("zeros", "ones", "full", "empty", "empty_strided", "scalar_tensor", "zeros_like",
                      "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty",
                      "fill", "fill_", "zero_", "lift_fresh"))
RANDOM = set(_packets("rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli",
                      "bernoulli_", "uniform_", "normal_", "native_dropout", "randperm", "exponential_"))
COPIES = set(_packets("_to_copy", "clone", "alias", "detach", "lift_fresh_copy", "contiguous", "_conj"))

RULES: dict[Any, Callable[[Ctx], list[Value]]] = {}
for _names, _rule in [
    (("view", "_unsafe_view", "reshape", "_reshape_alias", "view_as"), view),
    (("expand",), expand),
    (("permute",), permute),
    (("transpose", "t"), transpose),
    (("unsqueeze",), unsqueeze),
    (("squeeze",), squeeze),
    (("slice",), slice_),
    (("select",), select),
    (("split", "split_with_sizes", "unbind", "chunk", "tensor_split"), split),
    (("alias", "detach", "lift_fresh_copy", "contiguous", "clone", "_to_copy"), alias),
    (("copy_", "copy"), copy_),
    (("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like"), like),
    (("new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided"), new_filled),
    (("fill_", "zero_", "uniform_", "normal_", "bernoulli_", "exponential_", "fill"), fill),
    (("sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "var", "std", "var_mean",
      "std_mean", "logsumexp", "norm", "linalg_vector_norm", "all", "any", "count_nonzero", "nansum", "nanmean",
      "aminmax"), reduction),
    (("_softmax", "_log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "argsort",
      "topk", "kthvalue", "mode", "median", "nanmedian", "flip", "roll", "tril", "triu", "glu", "_safe_softmax",
      "renorm"), along),
    (("cat",), cat),
    (("histc", "bincount"), counts),
    (("nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "masked_select",
      "_local_scalar_dense", "nonzero_static"), data_dependent),
    (("mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "addbmm"), mm),
    (("_grouped_mm",), grouped_mm),
    (("convolution", "_convolution"), convolution),
    (("native_layer_norm", "_fused_rms_norm"), layer_norm),
    (("native_group_norm",), group_norm),
    (("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
      "_native_batch_norm_legit_functional"), batch_norm),
    (("embedding",), embedding),
    (("nll_loss_forward", "nll_loss2d_forward", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
      "binary_cross_entropy", "binary_cross_entropy_with_logits", "soft_margin_loss", "multilabel_margin_loss",
      "multi_margin_loss"), loss),
    (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
      "_scaled_dot_product_fused_attention_overrideable"), attention),
    (("index",), index),
    (("index_select",), index_select),
    (("gather",), gather),
    (("scatter", "scatter_add", "scatter_reduce", "scatter_", "scatter_add_", "scatter_reduce_"), scatter),
    (("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"), index_put),
    (("index_add", "index_add_", "index_copy", "index_copy_", "index_fill", "index_fill_", "index_reduce"),
     index_add),
    (("repeat_interleave",), repeat_interleave),
    (("repeat",), repeat),
    (("constant_pad_nd",), pad),
    (("where", "masked_fill", "masked_fill_", "clamp", "clamp_min", "clamp_max", "native_dropout", "floor_divide",
      "remainder", "fmod", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "logical_and", "logical_or",
      "logical_not", "logical_xor", "isnan", "isinf", "isfinite", "nan_to_num", "sign", "type_as"), pointwise),
]:
    for _packet in _packets(*_names):
        RULES[_packet] = _rule


def register(op, rule: Callable[[Ctx], list[Value]]) -> None:
    """Give an operator (a custom op's overload packet) a batch rule."""
    RULES[op] = rule


def register_known_custom_ops() -> None:
    """Rules for operators other libraries define, when they are loaded: zb's attention, transformers' grouped
    matmul fallback."""
    for namespace, name, rule in (("zb", "flash_attention", attention),
                                  ("transformers", "grouped_mm_fallback", grouped_mm)):
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            continue
        RULES[packet] = rule

