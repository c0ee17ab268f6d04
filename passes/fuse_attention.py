"""fuse_attention: attention in the Dynamo graph -> one call of zb's flash-attention operator.

Contract
  input:  `plan.graph` (Dynamo's torch-level graph) and `plan.options.fuse_attention`.
  output: `plan.graph` is a copy of it in which each recognised attention is one call of
          `zb.ops.attention.attention(q, k, v, bias, causal, scale)` (the operator `zb::flash_attention`);
          `plan.counters["fused_attention"]` counts them and `plan.attention` records every candidate (each
          SDPA call and each softmax) with what was done and, for one left alone, why. Runs before the graph is
          cut into stages, so an attention is never split between two stages.

Recognised:
  * `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale)`;
  * `softmax(q @ k^T [* s | / s] [masked_fill(mask, -inf) | + mask], dim=-1) [dropout with p=0 or not training]
    @ v`, where k^T is `k.transpose(-2, -1)` (or any [.., D, Lk] value), s a constant, the mask a boolean tensor
    (a constant lower-triangular one becomes the causal flag, anything else an additive bias) or a tensor added
    to the scores that needs no gradient. Each intermediate must feed only the next step.
  q, k, v are [batch, heads, length, head_dim] (or [batch, length, head_dim]) of one floating dtype with equal
  head dims of at most HEAD_DIM_MAX.

    scores = q @ k.transpose(-2, -1) / 8.0          att = zb.ops.attention.attention(q, k, v, None, True,
    scores = scores.masked_fill(~tril, -inf)   ->                                          0.125)
    att = softmax(scores, dim=-1) @ v
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from zb.ops.attention import DTYPES, HEAD_DIM_MAX, attention
from zb.passes.autocast_regions import KEY as AUTOCAST
from zb.passes.plan import Plan, copy_module, run_fake

# (functions, Tensor method names) for each step of the pattern, as Dynamo records them.
SDPA = ((F.scaled_dot_product_attention,), ())  # (the builtin itself, which is what Dynamo records)
SOFTMAX = ((F.softmax, torch.softmax), ("softmax",))
CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint
MATMUL = ((operator.matmul, torch.matmul, torch.bmm), ("matmul", "bmm"))
DROPOUT = ((F.dropout, torch.dropout), ())
MASKED_FILL = ((torch.masked_fill,), ("masked_fill",))
ADD = ((operator.add, torch.add), ("add",))
DIVIDE = ((operator.truediv, torch.div, torch.true_divide), ("div",))
MULTIPLY = ((operator.mul, torch.mul), ("mul",))
MASK_VALUE_MAX = -1e4  # masked_fill with a value at most this: the masked scores vanish from the softmax


@dataclass(frozen=True)
class AttentionSite:
    """One candidate: the node that ends it, whether it was fused, and a note (the mask used, or the reason)."""

    node: str
    fused: bool
    note: str

    def __str__(self) -> str:
        return f"{self.node}: {'fused' if self.fused else 'left alone'} ({self.note})"


class _LeftAlone(Exception):
    """An attention candidate the pass leaves unfused (the reason is its message)."""


@dataclass
class _Match:
    """One recognised attention: the nodes it reads and the one whose value the fused call replaces."""
    end: fx.Node  # the node whose value the fused call replaces
    q: fx.Node
    k: fx.Node | None  # None: keys given transposed, as kt
    kt: fx.Node | None
    v: fx.Node
    scale: float | None
    causal: bool
    mask: fx.Node | None  # boolean: True where the score is replaced by mask_value (keep=False) or kept (keep=True)
    mask_value: float
    mask_keeps: bool
    bias: fx.Node | None  # additive
    chain: list[fx.Node]  # nodes the fused call makes dead, last first
    note: str


def fuse_attention(plan: Plan) -> Plan:
    gm = copy_module(plan.graph)
    plan.graph = gm
    plan.attention = []
    for graph_module in [gm, *_checkpointed_bodies(gm)]:
        candidates = [n for n in graph_module.graph.nodes if _is_call(n, SDPA) or _is_call(n, SOFTMAX)]
        for node in candidates:
            if not plan.options.fuse_attention:
                plan.attention.append(AttentionSite(node.name, False, "option fuse_attention=False"))
                continue
            try:
                match = _match_sdpa(node) if _is_call(node, SDPA) else _match_manual(node)
                _check_tensors(match)
            except _LeftAlone as reason:
                plan.attention.append(AttentionSite(node.name, False, str(reason)))
                continue
            _rewrite(graph_module, match)
            plan.attention.append(AttentionSite(match.end.name, True, match.note))
            plan.counters["fused_attention"] += 1
        graph_module.graph.lint()
        graph_module.recompile()
    if plan.options.fuse_attention:
        plan.counters["fused_attention"] += 0  # present (possibly 0) whenever the pass looked
    return plan


# ---- matching -------------------------------------------------------------------------------------------------

def _match_sdpa(node: fx.Node) -> _Match:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if args.get("enable_gqa"):
        raise _LeftAlone("enable_gqa=True (grouped-query attention) is not fused")
    dropout = args.get("dropout_p", 0.0)
    if isinstance(dropout, fx.Node) or dropout != 0:
        raise _LeftAlone(f"dropout_p={dropout} (only p=0 is fused; eval mode passes 0)")
    scale = args.get("scale")
    if isinstance(scale, fx.Node):
        raise _LeftAlone("scale is computed at run time")
    causal = bool(args.get("is_causal", False))
    mask = args.get("attn_mask")
    match = _Match(node, args["query"], args["key"], None, args["value"], scale, causal, None, 0.0, False, None,
                   [node], "F.scaled_dot_product_attention")
    if isinstance(mask, fx.Node):
        value = _value(mask)
        if value is not None and value.dtype == torch.bool:
            match.mask, match.mask_value, match.mask_keeps = mask, float("-inf"), True
            match.note += ", boolean mask as a bias"
        elif value is not None and value.requires_grad:
            raise _LeftAlone("the additive mask needs a gradient (a learned bias); the fused kernel computes none")
        else:
            match.bias = mask
            match.note += ", additive mask"
    elif mask is not None:
        raise _LeftAlone(f"attn_mask {mask!r} is not a tensor")
    match.note += ", causal" if causal else ""
    return match


def _match_manual(softmax: fx.Node) -> _Match:
    x = softmax.args[0]
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    dtype = softmax.kwargs.get("dtype")
    value = _value(x)
    if value is None or dim is None or dim not in (-1, value.dim() - 1):
        raise _LeftAlone(f"softmax over dim {dim}, not the last")
    if dtype is not None and dtype != value.dtype:
        raise _LeftAlone(f"softmax computes in {dtype}")
    # After the softmax: [dropout with p=0 or not training] then @ v.
    chain = [softmax]
    probs = softmax
    user = _only_user(probs, "the attention probabilities")
    if _is_call(user, DROPOUT):
        p = user.kwargs.get("p", user.args[1] if len(user.args) > 1 else 0.5)
        training = user.kwargs.get("training", user.args[2] if len(user.args) > 2 else True)
        if not (p == 0 or training is False):
            raise _LeftAlone(f"dropout p={p} in training on the attention probabilities")
        chain.insert(0, user)
        probs = user
        user = _only_user(probs, "the attention probabilities")
    if not _is_call(user, MATMUL) or user.args[0] is not probs:
        raise _LeftAlone(f"the softmax feeds {_describe(user)}, not probabilities @ v")
    end, v = user, user.args[1]
    chain.insert(0, end)
    # Before the softmax: [mask] [scale] q @ k^T.
    scores, mask, mask_value, bias, note = x, None, 0.0, None, []
    if _is_call(scores, MASKED_FILL):
        _only_user(scores, "the masked scores")
        mask, fill = scores.args[1], scores.args[2]
        if not isinstance(fill, (int, float)) or not (fill == float("-inf") or fill <= MASK_VALUE_MAX):
            raise _LeftAlone(f"masked_fill with {fill!r}; a mask must fill with -inf "
                             f"(or a value <= {MASK_VALUE_MAX:g})")
        mask_value = float(fill)
        chain.append(scores)
        scores = scores.args[0]
    elif _is_add(scores):
        _only_user(scores, "the masked scores")
        a, b = scores.args[0], scores.args[1]
        bias, scores = (b, a) if _is_scale_or_matmul(a) else (a, b)
        bias_value = _value(bias)
        if not isinstance(bias, fx.Node) or bias_value is None:
            raise _LeftAlone("the scores are added to a non-tensor")
        if bias_value.requires_grad:
            raise _LeftAlone("the additive mask needs a gradient (a learned bias)")
        note.append("additive mask")
        chain.append(x)
    scale = None
    divide = _is_call(scores, DIVIDE)
    if (divide or _is_call(scores, MULTIPLY)) and len(scores.args) == 2 and not scores.kwargs:
        _only_user(scores, "the scaled scores")
        a, b = scores.args
        constant, scores_in = (b, a) if _is_number(b) or divide else (a, b)
        if not _is_number(constant):
            raise _LeftAlone("the scores are scaled by a tensor, not a constant")
        scale = 1.0 / constant if divide else float(constant)
        chain.append(scores)
        scores = scores_in
    if not _is_call(scores, MATMUL):
        raise _LeftAlone(f"the softmax input comes from {_describe(scores)}, not q @ k^T")
    _only_user(scores, "the scores")
    chain.append(scores)
    q, kt = scores.args[0], scores.args[1]
    k = None
    if _is_method(kt, "transpose") and sorted(_norm_dims(kt)) == [-2, -1] and len(kt.users) == 1:
        k = kt.args[0]
        chain.append(kt)
    causal = False
    if mask is not None:
        constant = _constant(mask)
        shape = (_value(q).shape[-2], _value(kt).shape[-1])
        if constant is not None and _is_causal_fill(constant, shape):
            causal, note = True, ["causal (constant lower-triangular mask)", *note]
            chain.extend(_dead_after(mask, chain))
            mask = None
        else:
            note.append("boolean mask as a bias")
    if scale is None:
        scale = 1.0  # no scaling written: the scores are q @ k^T as they are
    return _Match(end, q, k, None if k is not None else kt, v, scale, causal, mask, mask_value, False, bias, chain,
                  ", ".join(["softmax(q @ k^T) @ v", *note]))


def _check_tensors(match: _Match) -> None:
    q, v = _value(match.q), _value(match.v)
    k = _value(match.k) if match.k is not None else _value(match.kt)
    if q is None or k is None or v is None:
        raise _LeftAlone("q, k or v is not a tensor")
    k_shape = k.shape if match.k is not None else (*k.shape[:-2], k.shape[-1], k.shape[-2])
    if q.dim() not in (3, 4) or len(k_shape) != q.dim() or v.dim() != q.dim():
        raise _LeftAlone(f"q is {q.dim()}-D; zb fuses [batch, heads, length, head_dim] (or 3-D) attention")
    if q.shape[:-2] != k_shape[:-2] or q.shape[:-2] != v.shape[:-2]:
        raise _LeftAlone(f"batch/head dims differ: q {list(q.shape)}, k {list(k_shape)}, v {list(v.shape)}")
    if not (q.shape[-1] == k_shape[-1] == v.shape[-1]):
        raise _LeftAlone(f"head dims differ (q/k {k_shape[-1]}, v {v.shape[-1]})")
    if k_shape[-2] != v.shape[-2]:
        raise _LeftAlone("k and v have different lengths")
    if q.shape[-1] > HEAD_DIM_MAX:
        raise _LeftAlone(f"head dim {q.shape[-1]} is above the kernel's {HEAD_DIM_MAX}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise _LeftAlone(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}; zb fuses one of "
                         f"{', '.join(str(d).replace('torch.', '') for d in DTYPES)}")
    for extra in (match.mask, match.bias):
        value = _value(extra) if extra is not None else None
        if extra is not None and (value is None or value.dim() > q.dim()):
            raise _LeftAlone("the mask does not broadcast to the scores")
    if match.scale is None:
        match.scale = 1.0 / math.sqrt(q.shape[-1])


# ---- rewriting -------------------------------------------------------------------------------------------------

def _rewrite(gm: fx.GraphModule, match: _Match) -> None:
    graph = gm.graph
    end = match.end
    three_d = _value(match.q).dim() == 3
    with graph.inserting_before(end):
        k = match.k if match.k is not None else _insert(graph, end, "call_method", "transpose", (match.kt, -2, -1))
        q, v = match.q, match.v
        dtype = _value(match.q).dtype
        cast = dict(end.meta.get(AUTOCAST, ())).get(_value(match.q).device.type)
        if cast is not None and dtype.is_floating_point and dtype != torch.float64:  # autocast leaves float64 alone
            # Eager's autocast runs scaled_dot_product_attention and matmul in the autocast dtype: so does the
            # fused attention (autocast_regions annotated the site).
            dtype = cast
            q, k, v = (t if _value(t).dtype == cast else _insert(graph, end, "call_method", "to", (t, cast))
                       for t in (q, k, v))
        if three_d:
            q, k, v = (_insert(graph, end, "call_method", "unsqueeze", (t, 0)) for t in (q, k, v))
        bias = match.bias
        if match.mask is not None:
            bias = _insert(graph, end, "call_function", mask_bias,
                           (match.mask, match.mask_value, match.mask_keeps, dtype))
        elif bias is not None:
            bias = _insert(graph, end, "call_method", "to", (bias, dtype))
        # The kernels take a mask of 2 or 4 dims; leading dims of size 1 keep eager's (right-aligned) broadcast: a 3-D
        # bias (of 3-D q, k, v, unsqueezed above) gets one, a [L, S] bias stays as it is.
        while bias is not None and _value(bias).dim() not in (2, 4):
            bias = _insert(graph, end, "call_method", "unsqueeze", (bias, 0))
        fused = _insert(graph, end, "call_function", attention, (q, k, v, bias, match.causal, match.scale))
        if three_d:
            fused = _insert(graph, end, "call_method", "squeeze", (fused, 0))
    fused.meta.update({k: v for k, v in end.meta.items() if k not in ("example_value", "val")})
    fused.meta["zb_attention_site"] = end.name
    end.replace_all_uses_with(fused)
    for node in match.chain:
        if not node.users:
            graph.erase_node(node)


def mask_bias(mask: torch.Tensor, value: float, keeps: bool, dtype: torch.dtype) -> torch.Tensor:
    """An additive bias from a boolean mask: `value` where mask is True (keeps=False) or False (keeps=True)."""
    where = ~mask if keeps else mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(where, value)


def _insert(graph: fx.Graph, like: fx.Node, op: str, target, args: tuple) -> fx.Node:
    node = graph.create_node(op, target, args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", AUTOCAST):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["example_value"] = _fake_run(node)
    return node


def _fake_run(node: fx.Node):
    args = fx.node.map_arg(node.args, _value)
    if node.op == "call_method":
        return run_fake(lambda: getattr(args[0], node.target)(*args[1:]), *args)
    return run_fake(lambda: node.target(*args), *args)


# ---- helpers ---------------------------------------------------------------------------------------------------

def _checkpointed_bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The bodies of activation-checkpointed regions (torch.utils.checkpoint under Dynamo is a higher-order op
    whose first argument is a subgraph), each replaced by a copy that the pass may rewrite."""
    bodies = []
    for node in gm.graph.find_nodes(op="get_attr"):
        body = getattr(gm, node.target, None)
        if isinstance(body, fx.GraphModule) and any(u.target is CHECKPOINT for u in node.users):
            body = copy_module(body)
            setattr(gm, node.target, body)
            bodies.append(body)
    return bodies




def _value(node):
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _is_call(node, kind: tuple[tuple, tuple[str, ...]]) -> bool:
    functions, methods = kind
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods)


def _is_method(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_add(node) -> bool:
    return _is_call(node, ADD) and len(node.args) == 2 and not node.kwargs


def _is_scale_or_matmul(node) -> bool:
    return any(_is_call(node, kind) for kind in (MATMUL, DIVIDE, MULTIPLY))


def _norm_dims(transpose: fx.Node) -> list[int]:
    value = _value(transpose.args[0])
    ndim = value.dim() if value is not None else 0
    return [d - ndim if isinstance(d, int) and d >= 0 else d for d in transpose.args[1:3]]


def _only_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise _LeftAlone(f"{what} ({node.name}) are also used by {', '.join(u.name for u in users if u)}"
                         if users else f"{what} ({node.name}) are unused")
    return users[0]


def _describe(node) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


def _constant(node: fx.Node, depth: int = 0) -> torch.Tensor | None:
    """The value of a node computed from constants only (torch.ones(...).tril() and the like), else None."""
    if depth > 8 or node.op not in ("call_function", "call_method"):
        return None
    args = []
    for a in node.args:
        if isinstance(a, fx.Node):
            value = _constant(a, depth + 1)
            if value is None:
                return None
            args.append(value)
        else:
            args.append(a)
    if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    try:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **node.kwargs)
        result = node.target(*args, **node.kwargs)
    except Exception:  # noqa: BLE001  (not something we can evaluate here: not a constant)
        return None
    return result if isinstance(result, torch.Tensor) else None


def _is_causal_fill(mask: torch.Tensor, shape: tuple[int, int]) -> bool:
    """mask marks exactly the scores above the diagonal (query i, key j > i), in every broadcast slice."""
    if mask.dtype != torch.bool or mask.dim() < 2 or tuple(mask.shape[-2:]) != tuple(shape):
        return False
    upper = torch.ones(shape, dtype=torch.bool).triu(1)
    return bool((mask == upper).all())


def _dead_after(mask: fx.Node, chain: list[fx.Node]) -> list[fx.Node]:
    """The constant mask's nodes, last first, that nothing outside the fused chain reads."""
    out, pending = [], [mask]
    removed = set(chain)
    while pending:
        node = pending.pop()
        if node in out or node.op not in ("call_function", "call_method"):
            continue
        if all(u in removed or u in out for u in node.users):
            out.append(node)
            pending.extend(a for a in node.all_input_nodes)
    return out
