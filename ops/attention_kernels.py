"""zb's flash-attention kernels in Triton, and the functions that launch them.

Forward: one program per (query block, batch x head) keeps a running max and sum (online softmax) over the key
blocks, skipping those above the diagonal when causal, and writes the output and the row log-sum-exp. Backward:
a dK/dV kernel (one program per key block, looping over the query blocks that see it) and a dQ kernel (one per
query block), both recomputing the probabilities from the log-sum-exp; no atomics, so results are deterministic.
fp32 products use IEEE precision (not TF32); bf16/fp16 inputs accumulate in fp32.

This module holds nothing but the kernels, so that a test can load a second copy of it under TRITON_INTERPRET=1
and run the same kernels on CPU tensors (`tests/test_attention.py`); `zb.ops.attention` registers them as
PyTorch operators.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(Ptr, b, h, s_b, s_h, s_r, s_d, offs_r, offs_d, r_ok, d_ok):
    """A [rows, BLOCK_D] tile of a [batch, heads, length, d] tensor, zeros outside it."""
    return tl.load(Ptr + b * s_b + h * s_h + offs_r[:, None] * s_r + offs_d[None, :] * s_d,
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: full precision, not TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(q, k, offs_m, offs_n, row_ok, col_ok, Bias, b, h, s_bb, s_bh, s_bm, s_bn, scale,
            HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """q k^T * scale + bias for one [BLOCK_M, BLOCK_N] tile, -inf where masked or outside the matrix."""
    s = _dot(q, tl.trans(k), IEEE) * scale
    if HAS_BIAS:
        s += tl.load(Bias + b * s_bb + h * s_bh + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    valid = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _forward_kernel(Q, K, V, Bias, Out, LSE,
                    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                    s_bb, s_bh, s_bm, s_bn, s_ob, s_oh, s_om, s_od,
                    H, Lq, Lk, D, scale,
                    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < D
    q = _tile(Q, b, h, s_qb, s_qh, s_qm, s_qd, offs_m, offs_d, row_ok, d_ok)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        k = _tile(K, b, h, s_kb, s_kh, s_kn, s_kd, offs_n, offs_d, col_ok, d_ok)
        v = _tile(V, b, h, s_vb, s_vh, s_vn, s_vd, offs_n, offs_d, col_ok, d_ok)
        s = _scores(q, k, offs_m, offs_n, row_ok, col_ok, Bias, b, h, s_bb, s_bh, s_bm, s_bn, scale,
                    HAS_BIAS, CAUSAL, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: nothing to rescale
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    l_i = tl.where(row_ok, l_i, 1.0)  # rows past Lq are never stored
    out = acc / l_i[:, None]  # a row with every key masked gives NaN, as eager softmax does
    tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _gradient_of_scores(q, k, v, do, lse, delta, offs_m, offs_n, row_ok, col_ok, Bias, b, h,
                        s_bb, s_bh, s_bm, s_bn, scale,
                        HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """For one tile: the probabilities P (recomputed from the forward's log-sum-exp) and dS = P * (dO V^T - delta)."""
    s = _scores(q, k, offs_m, offs_n, row_ok, col_ok, Bias, b, h, s_bb, s_bh, s_bm, s_bn, scale,
                HAS_BIAS, CAUSAL, IEEE)
    lse_ref = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.exp(s - lse_ref[:, None])  # masked scores are -inf: probability 0
    dp = _dot(do, tl.trans(v), IEEE)
    return p, p * (dp - delta[:, None])


@triton.jit
def _backward_kv_kernel(Q, K, V, Bias, DO, LSE, DELTA, DK, DV,
                        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                        s_bb, s_bh, s_bm, s_bn, s_db, s_dh, s_dm, s_dd,
                        H, Lq, Lk, D, scale,
                        HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK and dV for one block of keys, looping over the query blocks that see it."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Lk
    d_ok = offs_d < D
    k = _tile(K, b, h, s_kb, s_kh, s_kn, s_kd, offs_n, offs_d, col_ok, d_ok)
    v = _tile(V, b, h, s_vb, s_vh, s_vn, s_vd, offs_n, offs_d, col_ok, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier query rows see none of these keys
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q = _tile(Q, b, h, s_qb, s_qh, s_qm, s_qd, offs_m, offs_d, row_ok, d_ok)
        do = _tile(DO, b, h, s_db, s_dh, s_dm, s_dd, offs_m, offs_d, row_ok, d_ok)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
        p, ds = _gradient_of_scores(q, k, v, do, lse, delta, offs_m, offs_n, row_ok, col_ok, Bias, b, h,
                                    s_bb, s_bh, s_bm, s_bn, scale, HAS_BIAS, CAUSAL, IEEE)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    out_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + bh * Lk * D + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=out_mask)
    tl.store(DV + bh * Lk * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _backward_q_kernel(Q, K, V, Bias, DO, LSE, DELTA, DQ,
                       s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                       s_bb, s_bh, s_bm, s_bn, s_db, s_dh, s_dm, s_dd,
                       H, Lq, Lk, D, scale,
                       HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ for one block of queries, looping over the key blocks it sees."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < D
    q = _tile(Q, b, h, s_qb, s_qh, s_qm, s_qd, offs_m, offs_d, row_ok, d_ok)
    do = _tile(DO, b, h, s_db, s_dh, s_dm, s_dd, offs_m, offs_d, row_ok, d_ok)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        k = _tile(K, b, h, s_kb, s_kh, s_kn, s_kd, offs_n, offs_d, col_ok, d_ok)
        v = _tile(V, b, h, s_vb, s_vh, s_vn, s_vd, offs_n, offs_d, col_ok, d_ok)
        _, ds = _gradient_of_scores(q, k, v, do, lse, delta, offs_m, offs_n, row_ok, col_ok, Bias, b, h,
                                    s_bb, s_bh, s_bm, s_bn, scale, HAS_BIAS, CAUSAL, IEEE)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


KERNELS = (_forward_kernel, _backward_kv_kernel, _backward_q_kernel)
HELPERS = (_tile, _dot, _scores, _gradient_of_scores)


# ---- launching the kernels ------------------------------------------------------------------------------------

def _blocks(q: torch.Tensor) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    if q.device.type == "cpu":  # the interpreter: small tiles keep numpy's work proportional to the problem
        return 16, 16, block_d
    return (64, 64, block_d) if block_d <= 64 else (64, 32, block_d)


def _bias_strides(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    if bias is None:
        return q, (0, 0, 0, 0)  # any pointer: HAS_BIAS=False never reads it
    full = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return full, tuple(full.stride())


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def triton_forward(q, k, v, bias=None, causal=False, scale=None, launch=None):
    """The forward with zb's Triton kernel (any device Triton can run on; CPU under TRITON_INTERPRET=1)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    launch = launch or (lambda kernel: kernel)
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, lq), dtype=lse_dtype(q), device=q.device)
    bias_t, sb = _bias_strides(bias, q, k)
    block_m, block_n, block_d = _blocks(q)
    grid = (triton.cdiv(lq, block_m), batch * heads)
    launch(_forward_kernel)[grid](
        q, k, v, bias_t, out, lse, *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
        heads, lq, lk, d, scale, HAS_BIAS=bias is not None, CAUSAL=causal, IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return out, lse


def triton_backward(grad_out, q, k, v, out, lse, bias=None, causal=False, scale=None, launch=None):
    """dq, dk, dv with zb's Triton kernels."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    launch = launch or (lambda kernel: kernel)
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1).contiguous()  # rowsum(dO * O)
    dq = torch.empty((batch, heads, lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, lk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, heads, lk, d), dtype=v.dtype, device=v.device)
    bias_t, sb = _bias_strides(bias, q, k)
    block_m, block_n, block_d = _blocks(q)
    common = dict(HAS_BIAS=bias is not None, CAUSAL=causal, IEEE=q.dtype == torch.float32,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    strides = (*q.stride(), *k.stride(), *v.stride(), *sb, *grad_out.stride())
    launch(_backward_kv_kernel)[(triton.cdiv(lk, block_n), batch * heads)](
        q, k, v, bias_t, grad_out, lse, delta, dk, dv, *strides, heads, lq, lk, d, scale, **common)
    launch(_backward_q_kernel)[(triton.cdiv(lq, block_m), batch * heads)](
        q, k, v, bias_t, grad_out, lse, delta, dq, *strides, heads, lq, lk, d, scale, **common)
    return dq, dk, dv
