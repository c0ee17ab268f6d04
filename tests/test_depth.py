"""Depth: an 80-layer narrow GPT (2,700+ nodes in Dynamo's graph, 12,000+ in the stages' joint graphs) compiles
and trains with eager's gradients. The passes walk graphs in order, without recursion, so depth is no limit."""

from __future__ import annotations

import copy

import torch

import zb
from examples.gpt import GPT, PRESETS
from tests.helpers import assert_close


def test_an_80_layer_model_compiles_and_equals_eager():
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"].with_(n_layer=80, n_embd=16, n_head=2))
    reference = copy.deepcopy(model)
    x, y = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    backend = zb.ZbBackend({"stages": 4, "microbatches": 4, "compiler": "eager"})
    loss = torch.compile(model, backend=backend)(x, y)
    loss.backward()
    (plan,) = backend.plans
    assert len(plan.graph.graph.nodes) > 2000
    expected = reference(x, y)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), "loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"grad of {name}")
