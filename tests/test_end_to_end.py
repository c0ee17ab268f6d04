"""Tier (b): a zb training step equals eager PyTorch, loss and every gradient, for each model and option."""

import copy

import pytest
import torch

from tests import models
from tests.helpers import assert_close, assert_matches_eager, clone_args


@pytest.mark.parametrize("microbatches", [1, 4])
@pytest.mark.parametrize("name", sorted(models.END_TO_END))
def test_eager_pieces_match_eager_pytorch(name, microbatches):
    assert_matches_eager(models.END_TO_END[name], microbatches=microbatches, compiler="eager")


@pytest.mark.inductor
@pytest.mark.parametrize("microbatches", [1, 4])
@pytest.mark.parametrize("name", sorted(models.END_TO_END))
def test_inductor_pieces_match_eager_pytorch(name, microbatches):
    assert_matches_eager(models.END_TO_END[name], microbatches=microbatches, compiler="inductor")


@pytest.mark.parametrize("microbatches", [1, 4])
def test_gradients_are_scaled_by_the_incoming_gradient(microbatches):
    model, args = models.mlp(x_requires_grad=True)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="zb", options={"microbatches": microbatches, "compiler": "eager"})
    zb_args, ref_args = clone_args(args), clone_args(args)
    (compiled(*zb_args) * 3.0).backward()
    (reference(*ref_args) * 3.0).backward()
    assert_close(zb_args[0].grad, ref_args[0].grad, "input grad")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, name)


def test_training_loop_runs_unchanged_and_matches_eager_over_steps():
    model, (x, y) = models.mlp()
    reference, _ = models.mlp()
    reference.load_state_dict(model.state_dict())
    step = torch.compile(model, backend="zb", options={"microbatches": 2, "compiler": "eager"})
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    for _ in range(3):
        for fn, opt in ((step, opts[0]), (reference, opts[1])):
            loss = fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.detach(), q.detach(), name)


@pytest.mark.parametrize("microbatches", [1, 4])
def test_inference_runs_forward_pieces_only(microbatches):
    model, (idx, _) = models.gpt()
    backend_options = {"microbatches": microbatches, "compiler": "eager"}
    compiled = torch.compile(model, backend="zb", options=backend_options)
    with torch.no_grad():
        logits = compiled(idx)
        expected = model(idx)
    assert_close(logits, expected, "logits")
    assert all(p.grad is None for p in model.parameters())


def test_a_changed_batch_shape_compiles_a_new_plan():
    model, (x, y) = models.mlp()
    step = torch.compile(model, backend="zb", options={"microbatches": 2, "compiler": "eager"})
    for batch in (8, 4, 6):
        model.zero_grad()
        step(x[:batch], y[:batch]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x[:batch], y[:batch]).backward()
        for g, p in zip(grads, model.parameters()):
            assert_close(g, p.grad, f"batch {batch}")
