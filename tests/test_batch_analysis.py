"""analyze_batch: which dims carry the batch, and the operations that mix samples, from the ops' semantics.

Each op family runs along the batch dimension (refused, naming the op and its source line) and along another
dimension (exact against eager): 2 stages, 4 microbatches, compiler="eager", in one process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zb
from tests.helpers import assert_close
from zb.core.errors import ZbError
from zb.passes.batch_rules import view_dims

B, H = 8, 16


class Net(nn.Module):
    """x [B, T, 8] -> linear -> op(h) -> linear -> [B, T, 4]; the op under test sits between two stages' worth of
    layers, so the cut never hides it."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b = nn.Linear(8, H), nn.Linear(H, H)
        self.c, self.d = nn.Linear(H, H), nn.Linear(H, 4)
        self.op = op

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        h = self.op(h)
        return self.d(torch.tanh(self.c(h)))


def run_op(op, loss=lambda o, y: F.mse_loss(o, y), microbatches=4, stages=2, **options):
    """(zb loss, eager loss, zb model, eager model) after one step each; raises what zb raises."""
    torch.manual_seed(0)
    model = Net(op)
    reference = copy.deepcopy(model)
    x, y = torch.randn(B, 6, 8), torch.randn(B, 6, 4)
    step = torch.compile(lambda x, y: loss(model(x), y), backend="zb",
                         options={"stages": stages, "microbatches": microbatches, "compiler": "eager", **options})
    got = step(x, y)
    got.backward()
    want = loss(reference(x), y)
    want.backward()
    return got, want, model, reference


def assert_exact(got, want, model, reference, what):
    assert_close(got.detach(), want.detach(), f"{what}: loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"{what}: grad of {name}")


# The table: each silently wrong before, each refused now with the op and the line that wrote it.
ALONG_BATCH = {
    "softmax(0)": (lambda h: h.softmax(0), "softmax"),
    "cumsum(0)": (lambda h: h.cumsum(0), "cumsum"),
    "sort(0)": (lambda h: h.sort(0).values, "sort"),
    "flip(0)": (lambda h: h.flip(0), "flip"),
    "roll(1, 0)": (lambda h: h.roll(1, 0), "roll"),
    "x - x.mean(0)": (lambda h: h - h.mean(0), "mean"),
    "sum(0) broadcast back": (lambda h: h * h.sum(0, keepdim=True), "sum"),
    "topk over the batch": (lambda h: h.topk(2, 0).values.mean(0) + h, "topk"),
    "log_softmax(0)": (lambda h: F.log_softmax(h, 0), "log_softmax"),
    "cat along the batch": (lambda h: torch.cat([h[1:], h[:1]]), "slice"),
    "first sample": (lambda h: h + h[:1], "slice"),
    "select one sample": (lambda h: h + h[0], "select"),
    "index_select over the batch": (lambda h: h + h.index_select(0, torch.zeros(1, dtype=torch.long)),
                                    "index_select"),
    "samples times samples": (lambda h: (h.flatten(1) @ h.flatten(1).T).sum(-1)[:, None, None] + h, "mm"),
    "arange over the batch": (lambda h: h + torch.arange(h.shape[0])[:, None, None], "add"),
    "batch norm in training": (nn.BatchNorm1d(6), "batch_norm"),
    "batch-major meets time-major": (lambda h: (h.reshape(-1, H) + h.transpose(0, 1).reshape(-1, H)).view(h.shape),
                                     "add"),
    "every sample minus every other": (lambda h: h + (h.mean((1, 2))[:, None] - h.mean((1, 2))[None, :])
                                       .sum(1)[:, None, None], "sub"),
    "a buffer written per sample, then flipped": (lambda h: _written(h).flip(0), "flip"),
    "normalise over the flattened batch": (lambda h: F.layer_norm(h.flatten(0, 1).T, (h.shape[0] * 6,)).T
                                           .reshape(h.shape), "layer_norm"),
}

ALONG_OTHER = {
    "softmax(-1)": lambda h: h.softmax(-1),
    "cumsum(1)": lambda h: h.cumsum(1),
    "sort(-1)": lambda h: h.sort(-1).values,
    "flip(1)": lambda h: h.flip(1),
    "roll(1, 1)": lambda h: h.roll(1, 1),
    "x - x.mean(-1)": lambda h: h - h.mean(-1, keepdim=True),
    "topk(-1)": lambda h: h.topk(4, -1).values.repeat(1, 1, 4),
    "layer_norm": lambda h: F.layer_norm(h, (H,)),
    "cat along features": lambda h: torch.cat([h[..., 1:], h[..., :1]], -1),
    "gather along features": lambda h: h.gather(-1, h.argsort(-1)),
    "flatten(0, 1) and back": lambda h: torch.tanh(h.flatten(0, 1)).view(h.shape),
    "transpose(0, 1), softmax over the batch's new dim... of time": lambda h: h.transpose(0, 1).softmax(0)
    .transpose(0, 1),
    "reshape(-1, H) @ W": lambda h: (h.reshape(-1, H) @ torch.eye(H)).view(h.shape),
    "attention over time": lambda h: F.scaled_dot_product_attention(
        *(h.view(h.shape[0], 6, 2, H // 2).transpose(1, 2),) * 3, is_causal=True).transpose(1, 2).reshape(h.shape),
    "a position table": lambda h: h + torch.arange(h.shape[1])[None, :, None],
    "dropout mask per sample": lambda h: h * (torch.ones(h.shape[0], 1, 1) * 0.5),
    "einsum per sample": lambda h: torch.einsum("bth,bsh->bts", h, h).softmax(-1) @ h,
    "interpolate along time (DTensor's rule)": lambda h: F.interpolate(h.transpose(1, 2), scale_factor=2.0)
    .transpose(1, 2)[:, ::2],
    "cumulative max over time": lambda h: h.cummax(1).values,
    "time-major flatten, linear, residual": lambda h: (lambda f: (f + torch.tanh(f @ torch.eye(H)))
                                                       .view(6, h.shape[0], H).transpose(0, 1))(
        h.transpose(0, 1).reshape(-1, H)),
    "tiled by repeat, weighted, summed back": lambda h: (h.repeat(3, 1, 1) * torch.sigmoid(h.mean(-1, True))
                                                         .repeat(3, 1, 1)).view(3, h.shape[0], 6, H).sum(0),
    "a buffer written per sample": lambda h: _written(h) + h,
    "x[arange(B), i] per sample": lambda h: h + h[torch.arange(h.shape[0]), h.argmax(1)[:, 0]][:, None],
}


def _written(h):
    """A zeros buffer of the batch's shape, written in place through a view."""
    out = torch.zeros(h.shape)
    out[:, :3].copy_(h[:, :3] * 2)
    return out


@pytest.mark.parametrize("name", list(ALONG_BATCH))
def test_an_op_along_the_batch_is_refused_with_its_source_line(name):
    op, what = ALONG_BATCH[name]
    with pytest.raises(ZbError, match=rf"(?s)mixes samples across the batch.*{what}|{what}.*mixes samples") as e:
        run_op(op)
    assert "test_batch_analysis.py" in str(e.value), str(e.value)


@pytest.mark.parametrize("name", list(ALONG_OTHER))
def test_the_same_family_along_another_dimension_is_exact(name):
    assert_exact(*run_op(ALONG_OTHER[name]), name)


@pytest.mark.parametrize("microbatches, data_parallel", [(1, 2), (2, 2)])
def test_data_parallel_replicas_split_the_batch_too(microbatches, data_parallel):
    """With one microbatch but two replicas the batch is still split: the same op is refused."""
    with pytest.raises(ZbError, match="softmax"):
        run_op(lambda h: h.softmax(0), microbatches=microbatches, data_parallel=data_parallel)


def test_one_microbatch_without_replicas_runs_any_op():
    assert_exact(*run_op(lambda h: h.softmax(0), microbatches=1), "softmax(0) with one microbatch")


def test_a_sum_over_the_batch_inside_the_loss_is_refused_unless_the_loss_analysis_reads_it():
    """(o - y).pow(2).sum(0).mean() is linear in the samples, but the loss analysis reads sums and means of
    per-sample values only: refused, never silently wrong."""
    with pytest.raises(ZbError, match="sum"):
        run_op(lambda h: h, loss=lambda o, y: (o - y).pow(2).sum(0).mean())


def test_an_explicit_loss_reduction_answers_for_reductions_but_not_for_their_use_per_sample():
    got, want, model, reference = run_op(lambda h: h, loss=lambda o, y: o.pow(2).sum(0).mean() / 4,
                                         loss_reduction="mean")
    assert got.shape == want.shape
    with pytest.raises(ZbError, match="statistic over the batch"):
        run_op(lambda h: h * h.mean(), loss_reduction="mean")


def test_the_analysis_is_recorded_on_the_plan():
    """Every value's batch dims (with the per-sample extent) and the rules that answered are on the plan."""
    torch.manual_seed(0)
    model = Net(lambda h: h.flatten(0, 1).view(h.shape))
    backend = zb.ZbBackend({"stages": 2, "microbatches": 4, "compiler": "eager"})
    step = torch.compile(lambda x: model(x).pow(2).mean(), backend=backend)
    step(torch.randn(B, 6, 8)).backward()
    (plan,) = backend.plans
    dims = plan.batch.dims
    flat = next(n for n in plan.graph.graph.nodes if n.name.startswith("flatten"))
    assert dims[flat.name] == {0: 6}  # [2, 6, H] -> [12, H]: 6 rows per sample
    assert all(d == {0: 1} for name, d in dims.items() if name.startswith("linear"))
    assert [m.node for m in plan.batch.mixing] == ["mean"]  # the loss's own mean, excused by normalize_loss
    assert plan.counters["analyze_batch.own"] > 0


@pytest.mark.parametrize("src, out, dims, micro, expected", [
    ((2, 6, 16), (12, 16), {0: 1}, 2, {0: 6}),  # [B, T, H] -> [B*T, H]: the batch stays outermost
    ((12, 16), (2, 6, 16), {0: 6}, 2, {0: 1}),  # and back
    ((12, 16), (6, 2, 16), {0: None}, 2, {0: None, 1: None}),  # unknown layout: every piece may carry it
    ((1, 6, 16), (6, 16), {0: 1}, 1, {0: 6}),  # a microbatch of one sample keeps its batch dim
    ((6, 16), (1, 6, 16), {0: 6}, 1, {0: 1}),  # and finds it again (F.linear's view back)
    ((1, 6, 16), (96,), {0: 1}, 1, {0: 96}),
    ((8, 2), (4, 2, 2), {0: 2}, 4, {0: 1}),  # [T*k] -> [T, k]: the batch moves to T (MoE's top-k rows)
    ((4, 4), (16,), {0: 1, 1: 1}, 4, {0: None}),  # two batch dims merged
    ((6, 2, 16), (12, 16), {1: 1}, 2, {0: ("tiled", 2, 1)}),  # [T, B] flattened: the batch repeats every 2 rows
    ((12, 16), (6, 2, 16), {0: ("tiled", 2, 1)}, 2, {1: 1}),  # and splits back onto B
    ((4, 6, 8), (24, 8), {1: ("tiled", 3, 1)}, 3, {0: ("tiled", 3, 1)}),  # tiles stay tiles when merged outside
])
def test_view_dims(src, out, dims, micro, expected):
    assert view_dims(src, out, dims, micro) == (expected, None)


@torch.library.custom_op("zbtest::row_scale", mutates_args=())
def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Per sample: each row scaled by its own norm."""
    return x / (1 + x.norm(dim=-1, keepdim=True))


@torch.library.custom_op("zbtest::center", mutates_args=())
def center(x: torch.Tensor) -> torch.Tensor:
    """Mixes samples: subtracts the mean over dim 0."""
    return x - x.mean(0)


for _op in (row_scale, center):
    _op.register_fake(lambda x: torch.empty_like(x))
    _op.register_autograd(lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None)


def test_a_custom_op_without_a_rule_is_checked_on_random_data():
    """No zb or DTensor rule: the op runs on two microbatches joined and on each alone; per sample, it is kept."""
    backend = zb.ZbBackend({"stages": 2, "microbatches": 4, "compiler": "eager"})
    torch.manual_seed(0)
    model = Net(lambda h: torch.ops.zbtest.row_scale(h))
    torch.compile(lambda x: model(x).pow(2).mean(), backend=backend)(torch.randn(B, 6, 8)).backward()
    (plan,) = backend.plans
    assert plan.counters["analyze_batch.empirical"] == 1


def test_a_custom_op_that_mixes_samples_is_refused_after_the_check():
    with pytest.raises(ZbError, match=r"zbtest.center|center.*two microbatches joined"):
        run_op(lambda h: torch.ops.zbtest.center(h))


def test_an_aten_op_without_a_zb_rule_is_answered_by_dtensors_sharding_rule():
    """upsample_nearest1d has no zb rule; DTensor's propagation says Shard(0) in gives Shard(0) out."""
    backend = zb.ZbBackend({"stages": 2, "microbatches": 4, "compiler": "eager"})
    torch.manual_seed(0)
    model = Net(ALONG_OTHER["interpolate along time (DTensor's rule)"])
    torch.compile(lambda x: model(x).pow(2).mean(), backend=backend)(torch.randn(B, 6, 8)).backward()
    (plan,) = backend.plans
    assert plan.counters["analyze_batch.dtensor"] >= 1
    with pytest.raises(ZbError, match="upsample"):  # the same op over the batch: DTensor asks to redistribute
        run_op(lambda h: F.interpolate(h.transpose(0, 2), scale_factor=2.0)[..., ::2].transpose(0, 2))


@pytest.mark.parametrize("name", ["layer_norm", "flatten(0, 1) and back", "attention over time",
                                  "x[arange(B), i] per sample"])
def test_one_sample_per_microbatch_keeps_the_batch_dim(name):
    """microbatches = batch size: every batch dim has size 1, and views must still find it."""
    assert_exact(*run_op(ALONG_OTHER[name], microbatches=B), f"{name}, one sample per microbatch")


@pytest.mark.parametrize("op, what", [(lambda h: h.softmax(0), "softmax"), (lambda h: h + h[:1], "slice"),
                                      (lambda h: h + torch.arange(h.shape[0])[:, None, None], "arange")])
def test_one_sample_per_microbatch_still_refuses_what_mixes(op, what):
    with pytest.raises(ZbError, match=what):
        run_op(op, microbatches=B)


def test_a_view_that_hides_where_one_samples_batch_dim_goes_is_refused_clearly():
    """einsum permutes the size-1 batch dim behind the others and views it away: zb cannot tell where it goes."""
    with pytest.raises(ZbError, match="cannot tell which dimension its batch dimension becomes"):
        run_op(ALONG_OTHER["einsum per sample"], microbatches=B)


@pytest.mark.parametrize("name, op", [
    ("[b, T, H] read as [T, b, H], batch back in front", lambda h: h.reshape(6, h.shape[0], H).transpose(0, 1)),
    ("[b, T, H] read as [T, b, H], summed over b", lambda h: h.reshape(6, h.shape[0], H).sum(1)[None]
     .expand(h.shape[0], 6, H)),
    ("[b*T] split as [T, b]", lambda h: torch.tanh(h.reshape(-1, H).view(6, -1, H)).view(h.shape)),
])
def test_a_reshape_that_moves_the_batch_into_another_dimension_is_refused(name, op):
    """Each row keeps one sample's numbers, but which ones depends on the batch size: a split computes another
    function of its samples than the whole batch does (silently wrong before)."""
    with pytest.raises(ZbError, match=r"reshaped into another dimension") as e:
        run_op(op)
    assert "test_batch_analysis.py" in str(e.value), str(e.value)
