"""Batch rules for contractions (with the grouped matmul of mixture-of-experts routing), normalisations,
embeddings, losses and attention, and the fallbacks for ops without a rule (DTensor's propagation, an empirical
check): see batch_rules.py. The rules for indexing and other ops that move positions live in batch_rules_index.py;
this module re-exports them so that batch_rules.py takes every op rule from one place."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from zb.core import torch_internals
from zb.passes.batch_facts import NONE, Ctx, Value, tensors
from zb.passes.batch_rules_index import (gather, index, index_add, index_put, index_select, pad, repeat,
                                         repeat_interleave, scatter)
from zb.passes.batch_rules_shape import pointwise

__all__ = ["attention", "batch_norm", "convolution", "embedding", "fallback", "gather", "group_norm", "grouped_mm",
           "index", "index_add", "index_put", "index_select", "layer_norm", "loss", "mm", "pad", "repeat",
           "repeat_interleave", "scatter"]

aten = torch.ops.aten


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
            if ad in va.dims and bd in vb.dims and (va.dims[ad] != vb.dims[bd] or va.dims[ad] is None) \
                    and a is not b:
                ctx.mix(f"pairs samples laid out differently in the two operands of {ctx.name}")
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


# Without a local rule: DTensor's sharding propagation, then an empirical check -----------------------------------
def fallback(ctx: Ctx) -> list[Value]:
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
    return [Value({d: _same_layout(ctx, t, d)}) for t, d in zip(ctx.outs, answer)]


def _same_layout(ctx: Ctx, out: torch.Tensor, dim: int) -> Any:
    """The layout of an output's batch dim: the input's, when that input has its batch on the same dim with the
    same size (an op that keeps the batch dim as it is); else unknown."""
    for t in ctx.inputs():
        v = ctx.v(t)
        if dim in v.dims and t.dim() == out.dim() and t.shape[dim] == out.shape[dim]:
            return v.dims[dim]
    return None


def _empirical(ctx: Ctx) -> list[Value] | None:
    """Run the op on random data: two microbatches joined along their batch dims, and each alone; per sample when
    the joined result is the two results joined along one output dim."""
    shard = _single_batch_dims(ctx)
    if shard is None or ctx.func.is_view or any(a.alias_info is not None and a.alias_info.is_write
                                                  for a in ctx.schema.arguments):
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

    with torch_internals.unset_fake_temporarily():
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
        joined_along = [_joined_along(a, b, j) for a, b, j in zip(*outs)]
    results = []
    for fake, ok in zip(ctx.outs, joined_along):
        if not ok:
            return ctx.mix(f"calls {ctx.name} (no batch rule), which gives another result on two microbatches "
                           "joined than on each alone (checked on random data)")
        results.append(Value({ok[0]: _same_layout(ctx, fake, ok[0])}))
    return results


def _joined_along(a: torch.Tensor, b: torch.Tensor, joined: torch.Tensor) -> list[int]:
    """The dims d along which `joined` equals torch.cat([a, b], d)."""
    grown = [d for d in range(joined.dim()) if a.dim() == joined.dim() and a.shape[d] > 0
             and joined.shape[d] == a.shape[d] + b.shape[d]]
    return [d for d in grown if torch.allclose(torch.cat([a, b], d), joined, rtol=1e-5, atol=1e-6, equal_nan=True)]
