"""Changing input shapes (dynamic padding: another sequence length per batch) against eager PyTorch.

Dynamo compiles the function again for a new shape (static first, then with the changed sizes symbolic); the
dynamic graph serves every later length, and the pipelines zb builds per signature live in its cache
(zb/plan_cache.py), bounded by option plan_cache (least recently used freed first). Graphs never share a cache:
each bakes in its own constants.
"""

import copy

import pytest
import torch

import zb
from tests import models
from tests.helpers import assert_close, assert_grads_match
from zb.backend import CompiledGraph

LENGTHS = [16, 12, 8, 12, 16, 10]


def _train(lengths, plan_cache, monkeypatch):
    built = []
    original = CompiledGraph.build_plan

    def counting(self, args, training, *rest, **kwargs):
        built.append(tuple(args[-1].shape))
        return original(self, args, training, *rest, **kwargs)

    monkeypatch.setattr(CompiledGraph, "build_plan", counting)
    torch.manual_seed(0)
    model, _ = models.gpt()
    reference = copy.deepcopy(model)
    backend = zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager", "schedule": "zb-h1",
                            "plan_cache": plan_cache})
    step = torch.compile(model, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for length in lengths:
        ids = torch.randint(0, 256, (8, length), generator=generator)
        labels = torch.randint(0, 256, (8, length), generator=generator)
        loss = step(ids, labels)
        loss.backward()
        expected = reference(ids, labels)
        expected.backward()
        assert_close(loss, expected, f"length {length}: loss")
        assert_grads_match(model, reference, f"length {length}: ")
        model.zero_grad()
        reference.zero_grad()
    return backend, built


def test_changing_lengths_equal_eager_and_a_length_seen_before_builds_nothing(monkeypatch):
    backend, built = _train(LENGTHS, plan_cache=8, monkeypatch=monkeypatch)
    assert len(backend.graphs) == 2  # Dynamo's static graph, then its dynamic one
    # 16 again: built once more, in the dynamic graph (the static one's is not shared); 12 again: from the cache
    assert built == [(8, 16), (8, 12), (8, 8), (8, 16), (8, 10)], built
    assert backend.graphs[0].cache is not backend.graphs[1].cache


def test_the_cache_is_bounded_least_recently_used_first(monkeypatch):
    backend, built = _train([16, 12, 8, 12, 16], plan_cache=2, monkeypatch=monkeypatch)
    cache = backend.graphs[-1].cache
    # the static graph: 16; the dynamic one: 12, 8, 12 (kept), 16 (built; 8 freed)
    assert built == [(8, 16), (8, 12), (8, 8), (8, 16)], built
    assert len(cache.entries) == 2 and cache.evicted == 1
    kept = {sig[0][1] for key in cache.entries for source, sig in key[2:]  # (training, autocast state, inputs...)
            if source.startswith("L['") and "_modules" not in source and len(sig[0]) == 2}
    assert kept == {12, 16}, kept


def test_graphs_with_other_constants_never_share_a_pipeline():
    """A flag argument and module.training are baked into Dynamo's graphs, not into zb's signature key."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, y, l1: bool):
            out = self.fc2(self.drop(torch.relu(self.fc1(x))))
            return torch.nn.functional.l1_loss(out, y) if l1 else torch.nn.functional.mse_loss(out, y)

    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"}))
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    for l1 in (False, True):
        torch.testing.assert_close(step(x, y, l1), reference(x, y, l1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_plan_cache_option_is_checked(bad):
    with pytest.raises(zb.ZbOptionError, match="plan_cache"):
        zb.ZbBackend({"plan_cache": bad})
