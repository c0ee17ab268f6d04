"""Batch rules for ops that pick, write, repeat or pad positions: advanced indexing (including the steps of a
mixture-of-experts routing sort: rows put in the sort's order, the sort's inverse, rows put back), index_select,
gather, scatter, index_put, index_add, repeat_interleave, repeat and pad: see batch_rules.py."""

from __future__ import annotations

import torch

from zb.passes.batch_facts import NONE, Ctx, Value
from zb.passes.batch_rules_shape import pointwise, remap, tiling


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
    sources: list[set[int]] = []  # the output batch dims each operand brings
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
                    and src.shape[d] * vi.route[2] == vi.route[1].size and t.dim() == 1 \
                    and vs.dims[d] is not None and vi.route[1].extent == vi.route[2] * vs.dims[d]:
                ctx.run.result.rules["routing"] += 1
                dims[first] = None
                route = ("rows", vi.route[1])
                continue
            vary = [e for e in range(t.dim()) if t.shape[e] != 1 and e not in vi.uniform]
            if t.numel() == 1 and t.dim() > 0:  # arange(1) over a microbatch of one sample
                vary = [t.dim() - 1]
            if vi.route == ("iota",) and t.numel() == src.shape[d] and not vi.dims and len(vary) == 1:
                at = first + n_index - t.dim() + vary[0]  # arange over this batch dim: every sample in order
                dims[at] = vs.dims[d]
                sources.append({at})
                continue
            return ctx.mix("indexes along a batch dimension (picks samples by their position in the batch)")
        off = n_index - t.dim()
        for e, extent in vi.dims.items():
            dims[first + e + off] = extent
        if vi.dims:
            sources.append({first + e + off for e in vi.dims})
        if vi.route is not None and vi.route[0] in ("rows", "keys", "index"):
            route = ("rows", vi.route[1])
    from_src = {o for o in dims if o not in set().union(*sources)} if sources else set(dims)
    if from_src:
        sources.append(from_src)
    if any(a != sources[0] for a in sources):
        return ctx.mix("pairs samples with samples (indexes a batched tensor with batched indices along other "
                       "dimensions)")
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
    if not isinstance(src, torch.Tensor) or ctx.schema.overload_name == "Tensor":
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
    value = remap(v, {d: d + off for d in range(src.dim())})
    dims = dict(value.dims)
    for d in v.dims:  # copies of all samples end to end: the batch repeats every src.shape[d] positions
        if times[d + off] != 1:
            layout = tiling(v.dims[d], src.shape[d])
            dims[d + off] = ("tiled", *layout) if layout is not None else None
    return ctx.each(Value(dims, value.stat, value.uniform, value.route))


def pad(ctx: Ctx) -> list[Value]:
    src, widths = ctx.args[0], list(ctx.args[1])
    v = ctx.v(src)
    padded = {src.dim() - 1 - k // 2 for k, w in enumerate(widths) if w}
    if padded & set(v.dims):
        return ctx.mix("pads a batch dimension")
    return ctx.each(Value(dict(v.dims), v.stat, frozenset(), None))
