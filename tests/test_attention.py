"""Attention fusion: the zb flash-attention operator (CPU implementation and Triton kernels under the
interpreter) against eager attention, and the fuse_attention pass on SDPA and hand-written attention."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zb
from tests import models
from tests.helpers import assert_close, assert_grads_match
from zb.ops.attention import attention, reference

ROOT = pathlib.Path(__file__).parents[1]

KERNEL_TESTS = pathlib.Path(__file__).parent / "kernels" / "attention_kernels_check.py"


def test_triton_kernels_under_the_interpreter():
    """zb's Triton kernels on CPU: they need TRITON_INTERPRET=1 set before triton is first imported, so they run
    in a fresh process (tests/kernels/attention_kernels_check.py, also runnable on its own with pytest)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def _inputs(batch, heads, lq, lk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk))
    return q, k, v, torch.randn(batch, heads, lq, d, generator=g, dtype=dtype)


def _eager(q, k, v, grad, bias=None, causal=False, scale=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference(*leaves, None if bias is None else bias.double(), causal, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad.double()))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operator_on_cpu_matches_eager_with_gradients(dtype, causal):
    q, k, v, grad = _inputs(2, 3, 19, 19, 16, dtype=dtype, seed=3)
    bias = None if causal else torch.randn(19, 19, dtype=dtype)
    want = _eager(q, k, v, grad, bias, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, bias, causal)
    got = (out.detach(), *torch.autograd.grad(out, leaves, grad))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relative(g, w) <= tolerance, name


@pytest.mark.parametrize("case", ["float32 causal", "float64 bias", "transposed views", "bias of another dtype"])
def test_cpu_lowering_calls_aten_kernels_with_the_same_results(case):
    """The pieces compiled for CPU call PyTorch's flash kernels directly (no custom-operator dispatch): same
    values and the layouts the fake kernel promised; a call whose ATen form would differ stays zb's operator."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from zb.ops.attention import CPU_BACKWARD, CPU_FORWARD, lower_to_cpu_kernels

    dtype = torch.float64 if case == "float64 bias" else torch.float32
    q, k, v, grad = _inputs(2, 3, 16, 16, 8, dtype=dtype, seed=5)
    if case == "transposed views":  # as a GPT makes them: [B, L, H, D] memory seen as [B, H, L, D]
        q, k, v, grad = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, grad))
    bias = {"float64 bias": torch.randn(16, 16, dtype=dtype),
            "bias of another dtype": torch.randn(16, 16, dtype=torch.float64)}.get(case)

    def step(q, k, v, grad):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, bias, bias is None)
        return (out, *torch.autograd.grad(out, leaves, grad))

    gm = make_fx(step)(q, k, v, grad)
    want = gm(q, k, v, grad)
    replaced = lower_to_cpu_kernels(gm)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    if case == "bias of another dtype":  # ATen would not convert the mask: left to zb's operator
        assert replaced == 0 and CPU_FORWARD not in targets
        return
    assert replaced == 2 and {CPU_FORWARD, CPU_BACKWARD} <= targets
    assert not any("zb.flash_attention" in str(t) for t in targets)
    got = gm(q, k, v, grad)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.stride() == w.stride(), name
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


def test_operators_pass_torch_library_opcheck():
    import torch._functorch.config as functorch_config

    q, k, v, grad = (t.requires_grad_() for t in _inputs(1, 2, 8, 8, 16, dtype=torch.float32))
    out, lse = torch.ops.zb.flash_attention(q, k, v, None, True, 0.25)
    # Tracing into a triton_op's kernels needs a GPU driver; zb keeps its operators opaque (as capture_joint does).
    with functorch_config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.zb.flash_attention.default, (q, k, v, None, True, 0.25))
        torch.library.opcheck(torch.ops.zb.flash_attention_backward.default,
                              (grad.detach(), q.detach(), k.detach(), v.detach(), out.detach(), lse, None, True, 0.25))


# ---- the pass ------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """One attention layer in the spelling given by `form`; the rest is a linear layer and an MSE loss."""

    def __init__(self, form: str, dim=32, heads=2):
        super().__init__()
        self.form, self.heads = form, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.ones(8, 8, dtype=torch.bool).tril())

    def forward(self, x, y):
        b, t, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = (z.view(b, t, h, d).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        form = self.form
        if form == "sdpa":
            att = F.scaled_dot_product_attention(q, k, v)
        elif form == "sdpa_mask":
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:t, :t])
        elif form == "div_sqrt":
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v
        elif form == "mul_scale_causal":
            scores = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).tril() == 0, float("-inf"))
            att = scores.softmax(dim=-1) @ v
        elif form == "buffer_mask_dropout_eval":
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            scores = scores.masked_fill(~self.mask[:t, :t], -1e9)
            att = F.dropout(F.softmax(scores, dim=-1), p=0.1, training=False) @ v
        elif form == "additive":
            bias = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
            att = F.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d)) + bias, dim=-1) @ v
        elif form == "bmm_3d":  # heads folded into the batch, as older models write it
            q3, k3, v3 = (z.reshape(b * h, t, d) for z in (q, k, v))
            scores = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5
            att = torch.bmm(torch.softmax(scores, dim=-1), v3).view(b, h, t, d)
        elif form == "probs_returned":  # the probabilities are also an output: not fusable
            probs = F.softmax(q @ k.transpose(-2, -1), dim=-1)
            att = probs @ v
            return F.mse_loss(self.out(att.transpose(1, 2).reshape(b, t, c)), y) + probs.mean()
        elif form == "softmax_dim":  # softmax over the queries: not attention
            att = F.softmax(q @ k.transpose(-2, -1), dim=-2) @ v
        elif form == "dropout_training":
            att = F.dropout(F.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.5, training=True) @ v
        else:
            raise ValueError(form)
        return F.mse_loss(self.out(att.transpose(1, 2).reshape(b, t, c)), y)


FUSED = {
    "sdpa": "F.scaled_dot_product_attention",
    "sdpa_mask": "boolean mask as a bias",
    "div_sqrt": "softmax(q @ k^T) @ v",
    "mul_scale_causal": "causal (constant lower-triangular mask)",
    "buffer_mask_dropout_eval": "boolean mask as a bias",
    "additive": "additive mask",
    "bmm_3d": "softmax(q @ k^T) @ v",
}
LEFT_ALONE = {
    "probs_returned": "also used by",
    "softmax_dim": "not the last",
    "dropout_training": "dropout p=0.5 in training",
}


def _args(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, 32, generator=g), torch.randn(4, 8, 32, generator=g)


@pytest.mark.parametrize("form", list(FUSED))
def test_pass_fuses_each_form_and_training_matches_eager(form):
    torch.manual_seed(0)
    model = Attention(form)
    x, y = _args()
    plan = zb.explain(model, x, y, compiler="eager")
    assert plan.counters["fused_attention"] == 1
    (site,) = plan.attention
    assert site.fused and FUSED[form] in site.note
    ops = [n.target for n in plan.graph.graph.nodes if n.op == "call_function"]
    assert not any(t in (F.softmax, torch.softmax) for t in ops)
    forward = plan.stages[0].pieces["forward"]
    assert any("zb.flash_attention" in str(n.target) for n in forward.graph.nodes)
    _assert_trains_like_eager(model, x, y, {"compiler": "eager", "microbatches": 2})


@pytest.mark.parametrize("form", list(LEFT_ALONE))
def test_pass_leaves_other_forms_alone_and_says_why(form):
    model = Attention(form)
    plan = zb.explain(model, *_args(), compiler="eager")
    assert plan.counters["fused_attention"] == 0
    assert any(not s.fused and LEFT_ALONE[form] in s.note for s in plan.attention), plan.attention
    assert "left alone" in plan.summary() and LEFT_ALONE[form] in plan.summary()
    if form != "dropout_training":  # random: no eager run draws the same mask
        _assert_trains_like_eager(model, *_args(), {"compiler": "eager"})


def test_option_off_leaves_attention_to_inductor():
    model, (x, y) = models.gpt()
    plan = zb.explain(model, x, y, compiler="eager", fuse_attention=False)
    assert plan.counters["fused_attention"] == 0
    assert all(not s.fused and "fuse_attention=False" in s.note for s in plan.attention)
    assert len(plan.attention) == 2


def test_attention_backward_lands_in_b_when_the_stage_has_an_input_gradient():
    model, (x, y) = models.gpt()
    plan = zb.explain(model, x, y, compiler="eager", stages=2, split_points=["blocks.1"])
    last = plan.stages[1]
    def targets(piece):
        return [str(n.target) for n in last.pieces[piece].graph.nodes if n.op == "call_function"]
    assert any("flash_attention_backward" in t for t in targets("backward_input"))
    assert not any("flash_attention" in t for t in targets("backward_weight"))


@pytest.mark.parametrize("factory", [models.gpt, models.gpt_manual_attention], ids=["sdpa", "manual"])
def test_gpt_pipeline_with_fused_attention_through_inductor_matches_eager(factory):
    model, (x, y) = factory()
    plan = zb.explain(model, x, y, compiler="eager")
    assert plan.counters["fused_attention"] == 2
    _assert_trains_like_eager(model, x, y, {"microbatches": 2, "stages": 2, "schedule": "zb-h1"})


def _assert_trains_like_eager(model, x, y, options):
    import copy

    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="zb", options=options)
    loss = compiled(x, y)
    loss.backward()
    want = reference(x, y)
    want.backward()
    assert_close(loss, want, "loss")
    assert_grads_match(model, reference)


class PaddedAttention(nn.Module):
    """A padding mask passed in as an input (split into microbatches with the batch), used by SDPA and by the
    spelled-out form."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x, keep, y):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, 2, 16).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        scores = ((q @ k.transpose(-2, -1)) / 4.0).masked_fill(~keep[:, None, None, :], float("-inf"))
        a2 = scores.softmax(-1) @ v
        return F.mse_loss(self.out((a + a2).transpose(1, 2).reshape(b, t, c)), y)


def test_a_padding_mask_given_as_input_is_split_with_the_batch():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[1, 5:] = False
    keep[3, 2:] = False
    model = PaddedAttention()
    plan = zb.explain(model, x, keep, y, microbatches=2, compiler="eager")
    assert plan.counters["fused_attention"] == 2
    assert all("boolean mask as a bias" in site.note for site in plan.attention)
    import copy

    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    loss = torch.compile(model, backend="zb", options={"microbatches": 2, "stages": 2, "compiler": "eager"})(
        x, keep, y)
    loss.backward()
    want = reference(x, keep, y)
    want.backward()
    assert_close(loss, want, "loss")
    assert_grads_match(model, reference)
