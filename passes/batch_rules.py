"""The batch rules analyze_batch applies to each aten operation: batch dims of the inputs -> batch dims of the
outputs, or "mixes samples". Local rules are data: `RULES` maps an aten overload packet to the function that
answers for it; ops without an entry go to DTensor's sharding propagation, then to an empirical check.

Every rule reads the facts (`Value`) of its tensor arguments and returns one `Value` per tensor output. A rule
never assumes: when it cannot show that an operation works within samples, it calls `ctx.mix(...)`, which records
the operation and marks its outputs as computed from several samples (`stat`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zb.passes.batch_facts import NONE, Ctx, Value, fake_mode, tensors
from zb.passes.batch_rules_ops import (attention, batch_norm, convolution, embedding, fallback, gather, group_norm,
                                       grouped_mm, index, index_add, index_put, index_select, layer_norm, loss, mm,
                                       pad, repeat, repeat_interleave, scatter)
from zb.passes.batch_rules_shape import (alias, along, cat, complex_view, copy_, counts, data_dependent, expand,
                                         fill, like, new_filled, permute, pointwise, reduction, select, slice_,
                                         split, squeeze, stack, transpose, unsqueeze, view, view_dims)

aten = torch.ops.aten


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
            results = fallback(ctx)
    for t, value in zip(ctx.outs, results):
        run.set(t, value)
    for i, arg in enumerate(ctx.schema.arguments):  # in-place: the mutated argument now holds the result
        if arg.alias_info is not None and arg.alias_info.is_write and i < len(args) and results:
            if isinstance(args[i], torch.Tensor):
                run.set(args[i], results[0])
                written(ctx, args[i], results[0])


def written(ctx: Ctx, target: torch.Tensor, value: Value) -> None:
    """`target` was written in place: every other tensor on its storage (the base it is a view of, other views)
    now holds those values too. A batch dim of the write is found in the alias by its stride (unknown layout:
    every dim of the alias may carry the batch); constant dims are constant no more."""
    for other in ctx.run.aliases(target):
        if (other.shape, other.stride(), other.storage_offset()) == \
                (target.shape, target.stride(), target.storage_offset()):
            ctx.run.set(other, value)  # the same view of the same storage
            continue
        old = ctx.run.get(other)
        dims = dict(old.dims)
        for d, extent in value.dims.items():
            match = [e for e in range(other.dim()) if other.stride(e) == target.stride(d)
                     and other.shape[e] >= target.shape[d] > 1]
            if len(match) == 1:
                dims[match[0]] = extent if other.shape[match[0]] == target.shape[d] and dims.get(match[0], extent) \
                    == extent else None
            else:
                dims.update({e: None for e in range(other.dim()) if other.shape[e] != 1})
        if value.stat and (dims or old.dims):
            ctx.mix("writes a statistic of the batch into a per-sample tensor", "statistic")
            ctx.run.set(other, Value(stat=True))
            continue
        if value.route not in (None, ("iota",)) or (old.route is not None and value.dims):
            ctx.mix("writes rows grouped by a sort over the batch into another tensor")
            ctx.run.set(other, Value(stat=True))
            continue
        uniform = old.uniform if len(value.uniform) == target.dim() else frozenset()
        ctx.run.set(other, Value(dims, old.stat or value.stat, uniform, old.route if not value.dims else None))


def _no_facts(ctx: Ctx, packet, ins: list[torch.Tensor]) -> list[Value]:
    """No input carries the batch: the outputs do not either; note constant, random and arange values."""
    if packet in FILLED or packet in RANDOM:
        return [Value(uniform=frozenset(range(t.dim()))) for t in ctx.outs]
    if packet is aten.arange and ctx.outs[0].dim() == 1:
        bound = ctx.bound
        start, step = bound.get("start", 0), bound.get("step", 1)  # arange(end) has neither: 0 and 1
        if start in (0, None) and step in (1, None):
            return [Value(route=("iota",))]
    return [NONE] * len(ctx.outs)


# The rule table ---------------------------------------------------------------------------------------------------
def _packets(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


FILLED = set(_packets("zeros", "ones", "full", "empty", "empty_strided", "scalar_tensor", "zeros_like",
                      "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty",
                      "fill", "fill_", "zero_", "lift_fresh"))
RANDOM = set(_packets("rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli",
                      "bernoulli_", "uniform_", "normal_", "native_dropout", "randperm", "exponential_"))

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
    (("stack",), stack),
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
      "logical_not", "logical_xor", "isnan", "isinf", "isfinite", "nan_to_num", "sign", "type_as", "polar",
      "complex"), pointwise),
    (("view_as_real", "view_as_complex"), complex_view),
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


__all__ = ["NONE", "Ctx", "Value", "apply", "fake_mode", "register", "register_known_custom_ops", "tensors",
           "view_dims"]
