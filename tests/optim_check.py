"""Training with options["optimizer"] against the synchronous reference: clip_grad_norm_ + optimizer.step(),
skipping a step whose gradients are not all finite. Shared by tests/test_optimizer.py (one process) and
tests/distributed/optimizer_check.py (torchrun).

The data makes the run meaningful: every third batch is larger (its step gets clipped, the others do not, with
MAX_NORM), an inf in the first input feature on INF_STEPS makes only the first layer's gradient non-finite (the
forward stays finite through tanh), so ranks holding later stages have already updated and must roll back; a
NaN target on NAN_STEPS makes every gradient NaN.
"""

from __future__ import annotations

import copy

import torch

from tests.models import DeepMLP

STEPS = 20
MAX_NORM = 0.27
INF_STEPS = (4,)
NAN_STEPS = (11,)
RTOL, ATOL = 1e-5, 1e-6

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def batches(steps: int = STEPS, batch: int = 8, dim: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    data = []
    for i in range(steps):
        x = torch.randn(batch, dim, generator=generator) * (3.0 if i % 3 == 0 else 0.3)
        y = torch.randn(batch, dim, generator=generator)
        if i in INF_STEPS:
            x[0, 0] = float("inf")
        if i in NAN_STEPS:
            y[0, 0] = float("nan")
        data.append((x, y))
    return data


def reference(model, optimizer, data, max_norm) -> list[str]:
    """Synchronous training; returns what each step did: 'plain', 'clipped' or 'skipped'."""
    did = []
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        model(x, y).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            did.append("skipped")
            continue
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if max_norm else None
        did.append("clipped" if norm is not None and max_norm / (float(norm) + 1e-6) < 1 else "plain")
        optimizer.step()
    return did


def train_both(kind: str, options: dict, max_norm: float | None = MAX_NORM, factory=DeepMLP):
    """(zb model, zb optimizer, reference model, reference optimizer, what the reference did per step, backend)."""
    from zb import ZbBackend

    torch.manual_seed(0)
    model = factory()
    ref_model = copy.deepcopy(model)
    data = batches()
    ref_optimizer = OPTIMIZERS[kind](ref_model.parameters())
    did = reference(ref_model, ref_optimizer, data, max_norm)
    optimizer = OPTIMIZERS[kind](model.parameters())
    backend = ZbBackend({**options, "optimizer": optimizer, "max_grad_norm": max_norm})
    step = torch.compile(model, backend=backend)
    for x, y in data:
        step(x, y)
    return model, optimizer, ref_model, ref_optimizer, did, backend


def assert_same_training(model, optimizer, ref_model, ref_optimizer, what: str, owned=None) -> None:
    """Parameters and optimizer state equal the reference's (only `owned` parameter names, when given)."""
    state, ref_state = optimizer.state_dict(), ref_optimizer.state_dict()  # state_dict() validates pending steps
    for i, ((name, p), q) in enumerate(zip(model.named_parameters(), ref_model.parameters(), strict=True)):
        if owned is not None and name not in owned:
            continue
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name: f"{what}: parameter {n}: {m}")
        assert state["state"].get(i, {}).keys() == ref_state["state"].get(i, {}).keys(), f"{what}: state of {name}"
        for key, value in ref_state["state"].get(i, {}).items():
            torch.testing.assert_close(state["state"][i][key], value, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name, k=key: f"{what}: optimizer state {k} of {n}: {m}")
