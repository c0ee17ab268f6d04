"""The fused parameter update: one fused kernel over all of a stage's parameters.

The update reads the hyper-parameters of the user's param group (lr, betas, weight decay, ... at the moment it
runs, so learning-rate schedulers work) and the user's optimizer state, and writes the state back in the layout
torch.optim itself uses: `optimizer.state_dict()` stays valid and a checkpoint resumes with plain torch.optim.

The kernels are torch's multi-tensor fused ones (`aten._fused_adam_`, `_fused_adamw_`, `_fused_sgd_`): one call
updates every parameter of a stage that shares a device and dtype, on CPU and on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from zb.core.options import FUSED_OPTIMIZERS

SUPPORTED = tuple(getattr(torch.optim, name) for name in FUSED_OPTIMIZERS)

# One fused update: (params, grads, the user's state dict of each parameter, its param group) -> None.
UpdateKernel = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[dict], dict], None]


def state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The tensors an update writes in one parameter's optimizer state (what a rollback must restore)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def update_kernel(optimizer: torch.optim.Optimizer) -> UpdateKernel:
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
        return _adam
    if isinstance(optimizer, torch.optim.SGD):
        return _sgd
    raise TypeError(f"no fused update for {type(optimizer).__name__}")


def check_group(optimizer: torch.optim.Optimizer, group: dict) -> str | None:
    """Why zb cannot run this param group's update, or None."""
    if group.get("differentiable"):
        return "differentiable=True (the update is not recorded by autograd)"
    if isinstance(optimizer, torch.optim.SGD) and group.get("nesterov") and (
            group["momentum"] <= 0 or group["dampening"] != 0):
        return "nesterov needs momentum > 0 and dampening 0"
    return None


def _by_device_and_dtype(*lists: Sequence[Any]) -> list[tuple[list[Any], ...]]:
    groups: dict[tuple, tuple[list[Any], ...]] = {}
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        bucket = groups.setdefault(key, tuple([] for _ in lists))
        for target, item in zip(bucket, items):
            target.append(item)
    return list(groups.values())


def _adam(params, grads, states, group) -> None:
    amsgrad = group["amsgrad"]
    for p, state in zip(params, states):
        if not state:  # lazily, as torch.optim.Adam._init_group does
            on_device = group.get("fused") or group.get("capturable")
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                             else torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
    beta1, beta2 = (float(b) for b in group["betas"])
    for ps, gs, sts in _by_device_and_dtype(params, grads, states):
        steps = [s["step"] for s in sts]
        torch._foreach_add_(steps, 1)
        local = [s if s.device == ps[0].device else s.to(ps[0].device) for s in steps]
        kernel(
            ps, gs, [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts],
            [s["max_exp_avg_sq"] for s in sts] if amsgrad else [], local,
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]), amsgrad=amsgrad, maximize=bool(group["maximize"]),
        )


def _sgd(params, grads, states, group) -> None:
    momentum = float(group["momentum"])
    options = dict(weight_decay=float(group["weight_decay"]), momentum=momentum, lr=float(group["lr"]),
                   dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
                   maximize=bool(group["maximize"]))
    if momentum == 0:
        for ps, gs in _by_device_and_dtype(params, grads):
            torch._fused_sgd_(ps, gs, [], is_first_step=False, **options)
        return
    # A parameter's first step initialises its momentum buffer with its gradient; the kernel does that for a
    # whole call, so first steps and later steps go in separate calls.
    fresh = [s.get("momentum_buffer") is None for s in states]
    for first in (True, False):
        chosen = [(p, g, s) for p, g, s, f in zip(params, grads, states, fresh) if f == first]
        if not chosen:
            continue
        if first:
            for _, g, s in chosen:
                s["momentum_buffer"] = torch.empty_like(g)
        ps, gs, sts = (list(x) for x in zip(*chosen))
        for ps_, gs_, sts_ in _by_device_and_dtype(ps, gs, sts):
            torch._fused_sgd_(ps_, gs_, [s["momentum_buffer"] for s in sts_], is_first_step=first, **options)
