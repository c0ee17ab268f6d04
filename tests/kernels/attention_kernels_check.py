"""zb's Triton attention kernels against eager attention, run on CPU by Triton's interpreter.

Run with TRITON_INTERPRET=1 set before Python starts (tests/test_attention.py does so in a fresh process):
    TRITON_INTERPRET=1 python -m pytest tests/kernels/attention_kernels_check.py
On a machine with a GPU, without the variable, the same tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zb.ops import attention_kernels as kernels
from zb.ops.attention import reference

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 (set before Python starts)",
                allow_module_level=True)


def _inputs(batch, heads, lq, lk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk))
    return [t.to(DEVICE) for t in (q, k, v, torch.randn(batch, heads, lq, d, generator=g, dtype=dtype))]


def _eager(q, k, v, grad, bias=None, causal=False, scale=None):
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out = reference(*leaves, None if bias is None else bias.cpu().double(), causal, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad.cpu().double()))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the reference's largest magnitude; for a reference that is exactly zero (dq with
    a single key: the softmax is constant), the absolute error, which is fp32 rounding of terms that cancel."""
    error = (got.cpu().double() - want).abs().max().item()
    scale = want.abs().max().item()
    return error / scale if scale > 1e-6 else error


def _run(q, k, v, grad, bias=None, causal=False, scale=None):
    out, lse = kernels.triton_forward(q, k, v, bias, causal, scale)
    return (out, *kernels.triton_backward(grad, q, k, v, out, lse, bias, causal, scale)), lse

# Shapes: lengths not divisible by the tiles (16 under the interpreter, 64 on a GPU), Lq != Lk, head dims 32..128.
SHAPES = [(1, 2, 37, 37, 32), (2, 1, 20, 45, 64), (1, 1, 50, 33, 128), (2, 2, 16, 16, 48), (1, 1, 70, 70, 96)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_all_three_gradients_in_fp32(shape, causal):
    q, k, v, grad = _inputs(*shape, dtype=torch.float32)
    want = _eager(q, k, v, grad, causal=causal)
    got, lse = _run(q, k, v, grad, causal=causal)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relative(g, w) <= 1e-5, name


def test_additive_mask_and_strided_inputs():
    # q/k/v as views of one [batch, length, 3, heads, d] tensor (the layout after .transpose(1, 2)) and a bias
    # that broadcasts over batch and heads, with a row partly masked by -inf.
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 29, 3, 2, 32, generator=g).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    bias = torch.randn(29, 29, generator=g)
    bias[3, 5:] = float("-inf")
    bias = bias.to(DEVICE)
    grad = torch.randn(2, 2, 29, 32, generator=g).to(DEVICE)
    want = _eager(q, k, v, grad, bias, scale=0.3)
    got, _ = _run(q, k, v, grad, bias, scale=0.3)
    for name, g_, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relative(g_, w) <= 1e-5, name


def test_causal_with_more_queries_than_keys_is_top_left_aligned():
    q, k, v, grad = _inputs(1, 2, 40, 24, 32, dtype=torch.float32, seed=2)
    want = _eager(q, k, v, grad, causal=True)
    got, _ = _run(q, k, v, grad, causal=True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relative(g, w) <= 1e-5, name


BF16_IN_INTERPRETER = pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton 3.9's interpreter gets tl.dot on bf16 tiles wrong (a plain 16x16 bf16 product "
    "is off by 1e10: it multiplies the raw 16-bit patterns), so bf16 kernels are checked on a GPU only")


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=BF16_IN_INTERPRETER), torch.float16],
                         ids=["bf16", "fp16"])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v, grad = _inputs(1, 2, 40, 40, 64, dtype=dtype)
    want = _eager(q, k, v, grad, causal=True)
    got, lse = _run(q, k, v, grad, causal=True)
    assert got[0].dtype == dtype and lse.dtype == torch.float32
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relative(g, w) <= 2e-2, name  # the inputs and outputs carry 8 (bf16) or 11 (fp16) bits


@settings(max_examples=12, deadline=None, derandomize=True)
@example(batch=1, heads=1, lq=1, lk=1, d=32, causal=False, masked=False)  # one key: dq is exactly 0
@example(batch=2, heads=2, lq=65, lk=3, d=80, causal=True, masked=True)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), lq=st.integers(1, 70), lk=st.integers(1, 70),
       d=st.sampled_from([32, 40, 64, 80, 128]), causal=st.booleans(), masked=st.booleans())
def test_random_shapes_in_fp32(batch, heads, lq, lk, d, causal, masked):
    q, k, v, grad = _inputs(batch, heads, lq, lk, d, dtype=torch.float32, seed=lq * 100 + lk)
    bias = torch.randn(lq, lk).to(DEVICE) if masked else None
    want = _eager(q, k, v, grad, bias, causal)
    got, _ = _run(q, k, v, grad, bias, causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relative(g, w) <= 1e-5, (name, batch, heads, lq, lk, d, causal, masked)
