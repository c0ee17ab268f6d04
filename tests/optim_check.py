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
from dataclasses import dataclass

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


# float16 with dynamic loss scaling (options optimizer + grad_scaler) ---------------------------------------------
SCALED_STEPS, OVERFLOW_STEPS = 10, (3, 6)


def scaled_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every fourth batch larger (clipped); on OVERFLOW_STEPS targets far off, so the loss stays finite (float32)
    but its scaled gradient overflows float16 in the backward: the scaler must skip the step and back off."""
    generator = torch.Generator().manual_seed(0)
    data = []
    for i in range(SCALED_STEPS):
        x = torch.randn(8, 16, generator=generator) * (4.0 if i % 4 == 1 else 1.0)
        y = torch.randn(8, 16, generator=generator)
        data.append((x, y * 6e4 if i in OVERFLOW_STEPS else y))
    return data


def scaled_eager_steps(model, optimizer, scaler, data, microbatches: int, max_norm: float) -> tuple[list, list]:
    """Eager float16 training with torch.amp.GradScaler, microbatch by microbatch: scale(loss).backward(),
    unscale_, clip_grad_norm_, step, update. Returns, per step, whether the scaler skipped it, and its scale after."""
    skipped, scales = [], []
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        for part in zip(x.chunk(microbatches), y.chunk(microbatches)):
            with torch.autocast("cpu", dtype=torch.float16):
                partial = model(*part) / microbatches
            scaler.scale(partial).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        scales.append(scaler.get_scale())
    return skipped, scales


@dataclass
class ScaledRun:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    reference: torch.nn.Module
    ref_optimizer: torch.optim.Optimizer
    ref_scaler: torch.amp.GradScaler
    scales: list  # zb's scaler's scale after each step (read after the call)
    ref_scales: list
    skipped: list  # eager's skip decisions


def train_scaled(options: dict, factory=DeepMLP, max_norm: float = 0.26) -> ScaledRun:
    """zb with options + SGD (momentum) + a GradScaler under float16 autocast, and eager the same way; `max_norm`
    clips some steps of `factory`'s model, not all (0.26: DeepMLP's steps 1, 4 and 5)."""
    from zb import ZbBackend, synchronize

    torch.manual_seed(0)
    model = factory()
    reference = copy.deepcopy(model)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3) for _ in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (model, reference)]
    data = scaled_batches()
    step = torch.compile(model, backend=ZbBackend({**options, "optimizer": optimizers[0], "grad_scaler": scalers[0],
                                                  "max_grad_norm": max_norm}))
    scales = []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = step(x, y)
        assert loss.dtype == torch.float32 and bool(loss.isfinite()), loss  # the loss, unscaled
        scales.append(scalers[0].get_scale())
    synchronize(optimizers[0])
    skipped, ref_scales = scaled_eager_steps(reference, optimizers[1], scalers[1], data, options["microbatches"],
                                             max_norm)
    return ScaledRun(model, optimizers[0], scalers[0], reference, optimizers[1], scalers[1], scales, ref_scales,
                     skipped)


def assert_same_scaling(run: ScaledRun, what: str, validated_at_once: bool = True) -> None:
    """The same skipped steps, clipping on some steps only, the same scale trajectory (read after each step where
    this process validates at once; else only the final state) as eager with its GradScaler."""
    from zb.runtime.optimizer import history

    assert [i for i, s in enumerate(run.skipped) if s] == list(OVERFLOW_STEPS), f"{what}: eager skipped {run.skipped}"
    records = history(run.optimizer)
    assert [r.skipped for r in records] == run.skipped, f"{what}: {records}"
    assert any(r.clipped for r in records) and not all(r.clipped for r in records if not r.skipped), what
    if validated_at_once:
        assert run.scales == run.ref_scales, f"{what}: {run.scales} != {run.ref_scales}"
    assert run.scaler.state_dict() == run.ref_scaler.state_dict(), what
    assert run.ref_scales[3] == run.ref_scales[2] / 2 and max(run.ref_scales) > 2.0**14, run.ref_scales  # both ways
