"""Batch rules for elementwise ops, views, reductions and ops along one dimension (see batch_rules.py)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from zb.passes.batch_facts import Ctx, Sort, Value

aten = torch.ops.aten
# Ops that copy their input: a routing fact survives them.
COPIES = {aten._to_copy, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy, aten.contiguous, aten._conj}


# Elementwise --------------------------------------------------------------------------------------------------
def pointwise(ctx: Ctx, skip: int | None = None) -> list[Value]:
    """Broadcasting elementwise ops (and, with `skip`, ops elementwise in every dim but `skip`: cat)."""
    shape = ctx.outs[0].shape
    nd = len(shape)
    dims: dict[int, Any] = {}
    layouts: dict[int, torch.Tensor] = {}  # which input gave each out dim its layout
    stat = False
    ins = [t for t in ctx.inputs() if t.dim() > 0 or ctx.v(t).facts]
    routes: set = {ctx.v(t).route[1] for t in ins if ctx.v(t).route is not None and ctx.v(t).route[0] in
                   ("rows", "keys")}
    for t in ins:
        v = ctx.v(t)
        stat |= v.stat
        off = nd - t.dim()
        for d, extent in v.dims.items():
            od = d + off
            if od == skip:
                continue
            if t.shape[d] != shape[od]:
                return ctx.mix(f"broadcasts a batch dimension of size {t.shape[d]} to {shape[od]}")
            if od in dims and (dims[od] != extent or extent is None) and not routes and layouts.get(od) is not t:
                return ctx.mix(f"combines values whose samples are laid out differently along dimension {od} "
                               f"({dims[od]} and {extent}: positions of one sample meet another's)")
            dims[od] = extent
            layouts[od] = t
    for t in ins:
        v = ctx.v(t)
        own = {d + nd - t.dim() for d in v.dims} - {skip}
        if own and own != set(dims):
            return ctx.mix("pairs samples with samples (broadcasts batched tensors against each other along "
                           "different dimensions)")
    for od in dims:
        for t in ins:
            v, d = ctx.v(t), od - (nd - t.dim())
            if d < 0 or d in v.dims:
                continue
            if t.shape[d] == 1 and ctx.micro == 1 and _positional(v):
                return ctx.mix(f"lines up a tensor computed from arange, of shape {list(t.shape)}, with batch "
                               f"dimension {od}: with one sample per microbatch it may be arange(batch)")
            if d in v.uniform or t.shape[d] == 1:
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
    return ctx.each(Value(dims, stat, uniform - set(dims), route))


def _positional(v: Value) -> bool:
    """Computed from arange: with one sample per microbatch, a size-1 arange may be arange(batch)."""
    return v.route in (("iota",), ("positional",))


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
    if any(_positional(ctx.v(t)) for t in ins) and not any(ctx.v(t).dims for t in ins):
        return ("positional",)
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
    if route is not None and not _positional(v) and (len(v.dims) != 1 or len(dims) != 1):
        return ctx.mix("reshapes rows grouped by a sort over the batch")
    if route == ("iota",) and sum(s != 1 for s in out.shape) > 1:
        route = ("positional",)
    return ctx.each(Value(dims, v.stat, uniform, route))


def view_dims(src: tuple, out: tuple, dims: dict[int, Any], micro: int) -> tuple[dict[int, Any], str | None]:
    """Batch dims of a reshape from `src` to `out`. Dims are grouped where their products meet. A batch dim's
    layout says which sample each position belongs to: an int e (positions r // e), or ("tiled", I, e) when the
    batch repeats every I positions (sample (r % I) // e: a [T, B] block flattened, or a batch tiled by repeat).
    Merging keeps that form, scaled by the inner sizes; splitting gives it to the one out dim whose positions
    cross samples; anything else is an unknown layout (None)."""
    if not dims:
        return {}, None
    if 0 in src or 0 in out:
        return {o: None for o, s in enumerate(out) if s != 1}, None
    result: dict[int, Any] = {}
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
        if not go:  # size-1 dims that vanish: with one sample per microbatch, where would the batch go?
            return {}, ("reshapes a microbatch of one sample so that zb cannot tell which dimension its batch "
                        "dimension becomes (use microbatches of at least 2 samples)")
        layout = tiling(dims[batch[0]], src[batch[0]]) if len(batch) == 1 else None
        if layout is None:
            for o in go:
                if out[o] != 1:
                    result[o] = None
            continue
        after = math.prod(src[e] for e in gi if e > batch[0])
        repeat, block = layout[0] * after, layout[1] * after  # the group's positions: sample (r % repeat) // block
        strides = [math.prod(out[e] for e in go[k + 1:]) for k in range(len(go))]
        carrying = [(o, stride) for o, stride in zip(go, strides) if out[o] != 1 and stride % repeat != 0
                    and block % (stride * out[o]) != 0]
        if not carrying and micro == 1 and repeat == pi:
            # One sample: no dim crosses samples here, but one would grow with the batch: a dim right outside one
            # sample's block ([T*H] -> [1, T, H]), else the outermost dim that holds the sample ([1*T, H]).
            outside = [(o, stride) for o, stride in zip(go, strides) if stride == block]
            holding = [(o, stride) for o, stride in zip(go, strides) if out[o] != 1]
            carrying = outside[-1:] or holding[:1]
        if not carrying:
            return {}, "reshapes the batch dimension away (a microbatch of one sample would lose it)"
        for o, stride in carrying:
            clean = len(carrying) == 1 and block % stride == 0 and repeat % stride == 0
            result[o] = untiled(("tiled", repeat // stride, block // stride), out[o]) if clean else None
    return result, None


def tiling(layout: Any, size: int) -> tuple[int, int] | None:
    """(repeat, block) of a batch dim's layout on a dim of `size` positions; None when unknown."""
    if isinstance(layout, int):
        return size, layout
    if isinstance(layout, tuple) and layout[0] == "tiled":
        return layout[1], layout[2]
    return None


def untiled(layout: Any, size: int) -> Any:
    """The simplest spelling of a layout: an int when the batch does not repeat along the dim."""
    if isinstance(layout, tuple) and layout[0] == "tiled" and layout[1] == size:
        return layout[2]
    if isinstance(layout, tuple) and size % layout[1] != 0:
        return None
    return layout


def complex_view(ctx: Ctx) -> list[Value]:
    """view_as_real adds a trailing dim of 2, view_as_complex drops it: the leading dims keep their batch."""
    src, out = ctx.args[0], ctx.outs[0]
    v = ctx.v(src)
    kept = min(src.dim(), out.dim())
    if any(d >= kept for d in v.dims):
        return ctx.mix("reinterprets a batch dimension as complex parts")
    return ctx.each(Value({d: e for d, e in v.dims.items()}, v.stat, frozenset(d for d in v.uniform if d < kept),
                          v.route))


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


def remap(v: Value, mapping: dict[int, int]) -> Value:
    return Value({mapping[d]: e for d, e in v.dims.items() if d in mapping}, v.stat,
                 frozenset(mapping[d] for d in v.uniform if d in mapping), v.route)


def permute(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    order = [d % src.dim() for d in ctx.args[1]]
    return ctx.each(remap(ctx.v(src), {old: new for new, old in enumerate(order)}))


def transpose(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    n = max(src.dim(), 1)
    if ctx.func.overloadpacket is aten.t:
        a, b = 0, min(1, src.dim() - 1)
    else:
        a, b = ctx.args[1] % n, ctx.args[2] % n
    mapping = {d: d for d in range(src.dim())}
    mapping[a], mapping[b] = b, a
    return ctx.each(remap(ctx.v(src), mapping))


def unsqueeze(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    at = ctx.args[1] % (src.dim() + 1)
    mapping = {d: d + (d >= at) for d in range(src.dim())}
    value = remap(ctx.v(src), mapping)
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
    return ctx.each(remap(v, {d: k for k, d in enumerate(kept)}))


def _along_dim(ctx: Ctx) -> tuple[torch.Tensor, int, Value, dict[str, Any]]:
    """(the tensor, its `dim` argument made non-negative, its facts, the bound arguments)."""
    b = ctx.bound
    src = b["self"]
    return src, b["dim"] % max(src.dim(), 1), ctx.v(src), b


def slice_(ctx: Ctx) -> list[Value]:
    src, dim, v, b = _along_dim(ctx)
    end = b.get("end")
    whole = b.get("start") in (0, None) and (end is None or end >= 2 ** 62) and b.get("step", 1) in (1, None)
    if dim in v.dims and not whole:
        return ctx.mix("slices a batch dimension (picks samples by their position in the batch; a slice that "
                       "happens to cover a microbatch, h[:n], cuts samples off the whole batch)")
    return ctx.each(v if whole else replace(v, route=None if v.route == ("iota",) else v.route))


def select(ctx: Ctx) -> list[Value]:
    src = ctx.args[0]
    dim = ctx.args[1] % src.dim()
    v = ctx.v(src)
    if dim in v.dims:
        return ctx.mix("selects one position of a batch dimension (one sample by its position in the batch)")
    kept = [d for d in range(src.dim()) if d != dim]
    return ctx.each(remap(v, {d: k for k, d in enumerate(kept)}))


def split(ctx: Ctx) -> list[Value]:
    src, dim, v, _ = _along_dim(ctx)
    if dim in v.dims and len(ctx.outs) > 1:
        return ctx.mix("splits a batch dimension into pieces (groups samples by their position in the batch)")
    if ctx.func.overloadpacket is aten.unbind:
        kept = [d for d in range(src.dim()) if d != dim]
        return ctx.each(remap(v, {d: k for k, d in enumerate(kept)}))
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
    out = remap(replace(v, route=route, uniform=v.uniform - set(reduced)), mapping)
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
        if packet in (aten.sort, aten.argsort) and src.dim() == 1 and v.route is None and not v.stat \
                and v.dims[0] is not None:
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


def stack(ctx: Ctx) -> list[Value]:
    """torch.stack(tensors, dim): a new dim, so never along the batch; the inputs must agree on their batch dims."""
    parts = list(ctx.args[0])
    at = ctx.bound.get("dim", 0) % ctx.outs[0].dim()
    values = [remap(ctx.v(t), {d: d + (d >= at) for d in range(t.dim())}) for t in parts]
    layouts = {tuple(v.dims.items()) for v in values if v.dims}
    batched = {id(t) for t, v in zip(parts, values) if v.dims}
    if len(layouts) > 1 or (layouts and None in dict(next(iter(layouts))).values() and len(batched) > 1):
        return ctx.mix("stacks values whose samples are laid out differently")
    uniform = frozenset.intersection(*(v.uniform for v in values)) - {at}
    return ctx.each(Value(dict(next(iter(layouts))) if layouts else {}, any(v.stat for v in values), uniform))


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
