"""zb's flash-attention operator: `torch.ops.zb.flash_attention` and its backward, written in Triton.

    out, lse = torch.ops.zb.flash_attention(q, k, v, bias, causal, scale)
    dq, dk, dv = torch.ops.zb.flash_attention_backward(grad_out, q, k, v, out, lse, bias, causal, scale)

q: [batch, heads, Lq, D], k and v: [batch, heads, Lk, D] (any strides), bias: None or an additive mask that
broadcasts to [batch, heads, Lq, Lk] (it gets no gradient), causal: the top-left causal mask (query i sees keys
j <= i, as `F.scaled_dot_product_attention(is_causal=True)`), scale: the factor on q @ k^T. lse is the row-wise
log-sum-exp of the scaled scores (float32, float64 for float64 inputs), kept for the backward.

Both are registered with `torch.library.triton_op`, so on a GPU they run the Triton kernels of
`attention_kernels.py` (online-softmax forward; a dK/dV kernel and a dQ kernel backward, no atomics). On CPU they
run PyTorch's fused CPU flash-attention kernels, which is faster than the Triton interpreter by orders of
magnitude (pieces compiled for CPU call those ATen kernels directly: `lower_to_cpu_kernels`); `triton_forward` /
`triton_backward` run the Triton kernels on any tensors (on CPU under `TRITON_INTERPRET=1`), which is how the
tests check them.

Attention has no weights: every gradient it produces is an input gradient, so the B/W split puts its backward
wholly in B.
"""

from __future__ import annotations

import math

import torch
from torch.library import triton_op, wrap_triton

from zb.ops.attention_kernels import lse_dtype, triton_backward, triton_forward

HEAD_DIM_MAX = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- the operators ---------------------------------------------------------------------------------------------

@triton_op("zb::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_forward(q, k, v, bias, causal, scale, launch=wrap_triton)


@triton_op("zb::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_backward(grad_out, q, k, v, out, lse, bias, causal, scale, launch=wrap_triton)


@flash_attention.register_kernel("cpu")
def _forward_cpu(q, k, v, bias, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=_cpu_mask(bias, q), scale=scale)
    out_strides, lse_strides = _forward_strides(q)
    return _laid_out(out, out_strides), _laid_out(lse.to(lse_dtype(q)), lse_strides)


@flash_attention_backward.register_kernel("cpu")
def _backward_cpu(grad_out, q, k, v, out, lse, bias, causal, scale):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32), 0.0, causal,
        attn_mask=_cpu_mask(bias, q), scale=scale)
    return tuple(_laid_out(g, strides) for g, strides in zip((dq, dk, dv), _backward_strides(q, k, v)))


def _cpu_mask(bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(q.dtype)


# ---- output layouts ----------------------------------------------------------------------------------------------
# Inductor plans the code around an operator from the strides its fake kernel reports, so the fake and every real
# kernel must agree. The Triton kernels write contiguous outputs. PyTorch's CPU kernels write `out` in q's memory
# order and lse, dq, dk, dv in [batch, L, heads, (D)] order: reporting exactly that spares a copy of every output
# (and, since q, k, v usually come from `.view(B, L, H, D).transpose(1, 2)`, lets the transpose back be free).

def _blhd_strides(shape) -> tuple[int, ...]:
    """Strides of a [batch, heads, L, (D)] tensor stored in [batch, L, heads, (D)] order."""
    batch, heads, length, *rest = shape
    d = rest[0] if rest else 1
    strides = (length * heads * d, d, heads * d, 1)
    return strides if rest else strides[:3]


def _forward_strides(q: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides of (out, lse) for these inputs."""
    if q.device.type != "cpu":
        return _contiguous(q.shape), _contiguous(q.shape[:-1])
    return _dense_like(q), _blhd_strides(q.shape[:-1])


def _contiguous(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _dense_like(t: torch.Tensor) -> tuple[int, ...]:
    """The strides `torch.empty_like(t)` gives: t's own when dense, else dense in t's memory order."""
    order = sorted(range(t.dim()), key=lambda i: (t.stride(i), -i))  # innermost first
    strides, step = [0] * t.dim(), 1
    for i in order:
        strides[i] = step
        step *= max(t.shape[i], 1)
    return tuple(strides)


def _backward_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple[int, ...]]:
    if q.device.type != "cpu":
        return [_contiguous(t.shape) for t in (q, k, v)]
    return [_blhd_strides(t.shape) for t in (q, k, v)]


def _laid_out(value: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """`value` with these strides: itself when the kernel already wrote it so (the usual case), else a copy."""
    if value.stride() == strides:
        return value
    return torch.empty_strided(value.shape, strides, dtype=value.dtype, device=value.device).copy_(value)


@flash_attention.register_fake
def _forward_fake(q, k, v, bias, causal, scale):
    out_strides, lse_strides = _forward_strides(q)
    return (torch.empty_strided(q.shape, out_strides, dtype=q.dtype, device=q.device),
            torch.empty_strided(q.shape[:-1], lse_strides, dtype=lse_dtype(q), device=q.device))


@flash_attention_backward.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, bias, causal, scale):
    return tuple(torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
                 for t, strides in zip((q, k, v), _backward_strides(q, k, v)))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, bias = ctx.saved_tensors
    dq, dk, dv = torch.ops.zb.flash_attention_backward(grad_out, q, k, v, out, lse, bias, ctx.causal,
                                                       ctx.scale)
    return dq, dk, dv, None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


# ---- CPU: PyTorch's own kernels, called directly ------------------------------------------------------------------
# On CPU the operator's kernel is PyTorch's fused flash attention, reached through the custom operator's Python
# dispatch (tens of microseconds a call on top of the kernel). The pieces Inductor compiles to C++ call the ATen
# operators instead, wherever they produce exactly what the fake kernel promised (dtypes and strides), so the
# generated code and everything planned around it stays as it was.

CPU_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def lower_to_cpu_kernels(gm: torch.fx.GraphModule) -> int:
    """Replace each call of zb's operators on CPU tensors in `gm` by the ATen CPU kernel it runs; returns how
    many were replaced. A call the ATen kernel would run differently (a mask of another dtype, which it would not
    convert) or whose outputs it would lay out otherwise stays zb's operator."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.zb.flash_attention.default,
                                                             torch.ops.zb.flash_attention_backward.default):
            continue
        forward = node.target is torch.ops.zb.flash_attention.default
        tensors = node.args[:3] if forward else node.args[:6]
        bias, causal, scale = node.args[3:] if forward else node.args[6:]
        vals = [t.meta.get("val") for t in tensors]
        bias_val = bias.meta.get("val") if isinstance(bias, torch.fx.Node) else None
        promised = node.meta.get("val")
        if not all(isinstance(v, torch.Tensor) and v.device.type == "cpu" and _static(v) for v in vals) or \
                promised is None or (bias is not None and not (isinstance(bias_val, torch.Tensor) and
                                                               _static(bias_val) and bias_val.dtype == vals[0].dtype)):
            continue
        target = CPU_FORWARD if forward else CPU_BACKWARD
        # What the ATen kernel would return for these inputs, from its meta kernel.
        metas = [_on_meta(v) for v in vals]
        aten = target(*metas, 0.0, causal, attn_mask=None if bias is None else _on_meta(bias_val), scale=scale)
        if len(aten) != len(promised) or not all(
                a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() for a, b in zip(aten, promised)):
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(target, (*tensors, 0.0, causal), {"attn_mask": bias, "scale": scale})
        call.meta = dict(node.meta)  # the same values as the promised ones
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(n, int) for n in (*t.shape, *t.stride()))


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _flops(q_shape, k_shape, *args, **kwargs) -> int:
    batch, heads, lq, d = q_shape
    return 4 * batch * heads * lq * k_shape[2] * d  # two matmuls of 2*Lq*Lk*D each


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.zb.flash_attention)
    def forward_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
        return _flops(q_shape, k_shape)

    @register_flop_formula(torch.ops.zb.flash_attention_backward)
    def backward_flops(grad_out_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * _flops(q_shape, k_shape) + _flops(q_shape, k_shape) // 2  # five matmuls


_register_flops()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias [causal]) @ v with zb's operator; what the attention pass puts in graphs."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.zb.flash_attention(q, k, v, bias, causal, scale)[0]


def reference(q, k, v, bias=None, causal=False, scale=None) -> torch.Tensor:
    """The same attention in plain PyTorch (the eager reference tests and `zb check` compare against)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
