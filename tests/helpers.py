"""Compare a zb-compiled training step with eager PyTorch: loss, every parameter gradient, input gradients."""

from __future__ import annotations

import copy

import torch

RTOL = 1e-5
ATOL = 1e-6  # gradients that are exactly zero in eager may come out as ~1e-9 after a different summation order


def clone_args(args):
    return tuple(
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )


def run_both(factory, **options):
    """One zb step and one eager step on identical copies; returns (zb, eager) dicts of results."""
    torch.manual_seed(0)
    model, args = factory()
    reference = copy.deepcopy(model)
    zb_args, ref_args = clone_args(args), clone_args(args)
    compiled = torch.compile(model, backend="zb", options=options)
    results = []
    for m, a, fn in ((model, zb_args, compiled), (reference, ref_args, reference)):
        out = fn(*a)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        results.append({
            "loss": loss.detach(),
            "outputs": [o.detach() for o in out[1:]] if isinstance(out, tuple) else [],
            "grads": {n: p.grad for n, p in m.named_parameters()},
            "input_grads": [x.grad for x in a if isinstance(x, torch.Tensor) and x.requires_grad],
        })
    return results[0], results[1]


def assert_close(actual, expected, what):
    assert (actual is None) == (expected is None), f"{what}: zb {actual is not None}, eager {expected is not None}"
    if actual is not None:
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def assert_grads_match(model, reference, what: str = "") -> None:
    """Every parameter's gradient equals eager's (both None, or close)."""
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"{what}grad of {name}")


def assert_owned_grads(model, reference, what: str) -> set[str]:
    """Under torch.distributed: every parameter has a gradient on some rank, and each rank's equals eager's;
    returns the names this rank holds gradients for."""
    import torch.distributed as dist

    owned = {n for n, p in model.named_parameters() if p.grad is not None}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, owned)
    missing = {n for n, _ in model.named_parameters()} - set().union(*everyone)
    assert not missing, f"{what}: no rank got a gradient for {sorted(missing)}"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name in owned:
            assert_close(p.grad, q.grad, f"{what}: grad of {name}")
    return owned


def assert_matches_eager(factory, **options):
    zb, eager = run_both(factory, **options)
    assert_close(zb["loss"], eager["loss"], "loss")
    for a, e in zip(zb["outputs"], eager["outputs"], strict=True):
        assert_close(a, e, "output")
    assert zb["grads"].keys() == eager["grads"].keys()
    for name in eager["grads"]:
        assert_close(zb["grads"][name], eager["grads"][name], f"grad of {name}")
    for i, (a, e) in enumerate(zip(zb["input_grads"], eager["input_grads"], strict=True)):
        assert_close(a, e, f"grad of input {i}")
