"""Stage boundaries whose values alias each other, a stage's input or a parameter: each gets its own gradient.

AOTAutograd gives a graph output a tangent of its own only when it aliases nothing else (an output that is a view
of an input, or a view of another output, is regenerated outside the graph and its gradient merged into its
base's). A boundary that carried `h` and a view of `h` therefore sent one gradient back, and the stages before
it got a zero or wrong gradient without any error (found by tests/test_fuzz.py); views of one intermediate
(fused attention's q, k and v of `F.scaled_dot_product_attention(h, h, h)`) failed with "unexpected joint graph
input ... IntermediateBaseAOTOutput". capture_joint now clones such outputs. Each test checks that the plan really
sends aliased values across a boundary, that every one gets a gradient back, and eager's loss and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

import zb
from tests.helpers import assert_matches_eager

STAGES = [2, 3, 4]


class LayerNormOverFlattened(nn.Module):
    """The fuzzer's repro: layer_norm over h.flatten(0, 1), viewed back as h (the boundary carries h and the
    flattened view). With stages=3 every gradient of `a` was 0."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.a(x)
        h = F.layer_norm(h.flatten(0, 1), (8,)).view_as(h)
        return F.mse_loss(self.b(h.mean(1)), y)


class HAndTranspose(nn.Module):
    """h and h.T both cross a boundary (the gram-matrix shape the fuzzer found, without mixing samples' outputs
    in a way zb refuses: one microbatch)."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, y):
        h = torch.tanh(self.a(x))
        t = h.T
        g = torch.tanh(self.c(h)) @ t
        return F.mse_loss(self.b(g @ h), y)


class HAndView(nn.Module):
    """h and a view of h (h.unflatten(1, (2, 4))) both cross every boundary: stages begin at c, d and e."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.d, self.e = (nn.Linear(8, 8) for _ in range(4))
        self.b = nn.Linear(8, 4)

    def forward(self, x, y):
        h = torch.tanh(self.a(x))
        v = h.unflatten(1, (2, 4))
        g = torch.tanh(self.e(torch.tanh(self.d(torch.tanh(self.c(h))))))
        return F.mse_loss(self.b((g.unflatten(1, (2, 4)) * v).flatten(1) + h), y)


class SelfAttention3d(nn.Module):
    """F.scaled_dot_product_attention(h, h, h) on a 3-D h, fused by fuse_attention (the default): the boundary
    carries three views of h."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.a(x)
        h = F.scaled_dot_product_attention(h, h, h)
        return F.mse_loss(self.b(h.mean(1)), y)


class ParameterView(nn.Module):
    """A view of a parameter (w.t()) computed in the first stage and read in the last: the boundary value aliases
    a stage input (w got no gradient at all)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.a, self.c, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, y):
        wt = self.w.t()
        h = torch.tanh(self.c(torch.tanh(self.a(x))))
        return F.mse_loss(self.b(torch.tanh(h @ wt)), y)


def _factory(cls, shape):
    def make():
        torch.manual_seed(0)
        x = torch.randn(*shape, requires_grad=True)
        return cls(), (x, torch.randn(shape[0], 4))
    return make


MODELS = {
    "h-and-transpose": _factory(HAndTranspose, (8, 8)),
    "h-and-view": _factory(HAndView, (8, 8)),
    "sdpa-3d-fused": _factory(SelfAttention3d, (8, 6, 8)),
    "parameter-view": _factory(ParameterView, (8, 8)),
}


def _aliased_boundaries(plan) -> list[int]:
    """The boundaries (index of the receiving stage) across which the Dynamo graph's values alias each other or
    one of the graph's inputs: two sent values share a storage, or a sent value shares one with an input."""
    nodes = {n.name: n for n in plan.graph.graph.nodes}

    def storage(node):
        return StorageWeakRef(node.meta["example_value"].untyped_storage())

    inputs = {storage(n) for n in plan.graph.graph.find_nodes(op="placeholder")
              if isinstance(n.meta.get("example_value"), torch.Tensor)}
    found = []
    for stage in plan.stages[1:]:
        sent = [storage(nodes[key.name]) for key, _, _ in stage.receives_forward]
        if len(set(sent)) < len(sent) or inputs.intersection(sent):
            found.append(stage.index)
    return found


def _options(model: str, stages: int) -> dict:
    if model == "h-and-view":  # a cut at each module after a, so that h and v cross every boundary
        return {"split_points": ["c", "d", "e"][: stages - 1]}
    return {}


def _check_plan(factory, stages, **options):
    """The plan sends aliased values across a boundary (so the test exercises the case) and every value sent
    forward gets a gradient back."""
    model, args = factory()
    plan = zb.explain(model, *args, stages=stages, compiler="eager", **options)
    assert _aliased_boundaries(plan), plan.summary()
    for stage in plan.stages[1:]:
        sent = {key for key, _, _ in stage.receives_forward}
        back = {key for key, _, _ in plan.stages[stage.index - 1].receives_backward}
        assert back == sent, f"stage {stage.index - 1} -> {stage.index}: gradients back for {back}, sent {sent}"
    return plan


@pytest.mark.parametrize("stages", STAGES)
def test_the_fuzzers_layernorm_over_a_flattened_view_matches_eager(stages):
    factory = _factory(LayerNormOverFlattened, (8, 6, 8))
    if stages > 2:  # with two stages the cut sends h alone
        _check_plan(factory, stages)
    assert_matches_eager(factory, stages=stages, compiler="eager")


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("model", MODELS)
def test_a_boundary_that_carries_aliased_values_matches_eager(model, stages):
    _check_plan(MODELS[model], stages, **_options(model, stages))
    assert_matches_eager(MODELS[model], stages=stages, compiler="eager", **_options(model, stages))


@pytest.mark.parametrize("stages", STAGES)
def test_three_dimensional_sdpa_is_fused_and_its_views_cross_a_boundary(stages):
    plan = _check_plan(MODELS["sdpa-3d-fused"], stages)
    assert plan.counters["fused_attention"] == 1, plan.summary()


def test_aliased_boundary_values_with_microbatches_and_zb_h1():
    assert_matches_eager(_factory(LayerNormOverFlattened, (8, 6, 8)), stages=3, microbatches=4,
                         schedule="zb-h1", compiler="eager")


@pytest.mark.inductor
@pytest.mark.parametrize("model", ["h-and-transpose", "sdpa-3d-fused"])
def test_aliased_boundary_values_through_inductor(model):
    assert_matches_eager(MODELS[model], stages=3, compiler="inductor")


def test_inference_with_aliased_boundary_values():
    model, (x, y) = _factory(LayerNormOverFlattened, (8, 6, 8))()
    with torch.no_grad():
        got = torch.compile(model, backend="zb", options={"stages": 3, "compiler": "eager"})(x, y)
        torch.testing.assert_close(got, model(x, y), rtol=1e-5, atol=1e-6)
