"""The fused optimizer update of a set of parameters, and what undoes it: the pieces post-validation
(runtime/optimizer.py) applies early, restores or redoes once the step's global verdict is known.

An `Update` keeps one stage's parameters with their gradients until its step is validated. `FusedUpdater.apply`
runs the optimizer's fused kernel (ops/optimizer.py) over them, bucketed by param group, the gradients times the
clip coefficient and 1 / the loss scale; `backup`, taken before an early update, copies the parameters and their
optimizer state into buffers kept from step to step, so that `restore` puts them back bit for bit. `verdict` reads
a step's global gradient norm as torch.nn.utils.clip_grad_norm_ and a loss-scaled loop do; `updated_scale` is
`GradScaler.update()`'s arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zb.core.errors import ZbError
from zb.ops.optimizer import update_kernel

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coefficient = max_norm / (norm + 1e-6)


@dataclass
class Update:
    """One fused update of a set of parameters, kept until its step is validated."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    groups: list[dict]  # a copy of each parameter's param group (lr, betas, ...) as it was for this step
    applied: bool = False
    backup: list | None = None  # (parameter copy, optimizer state copy or None) per parameter, while unvalidated
    unscale: float = 1.0  # 1 / the step's loss scale: the gradients are that many times too large


class FusedUpdater:
    """Applies, backs up and restores `Update`s of one torch optimizer's parameters with its fused kernel, and
    says what a step's global gradient norm makes of them (plain, clipped or skipped)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float | None):
        self.optimizer, self.max_norm = optimizer, max_norm
        self.kernel = update_kernel(optimizer)
        self.group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        if not self.group_of:
            raise ZbError("options['optimizer'] holds no parameters")
        self._spares: dict = {}  # backup buffers per parameter, reused every step

    def make(self, params: list[torch.Tensor], grads: list[torch.Tensor], unscale: float) -> Update:
        """An update of `params` (the optimizer's) with `grads`, under their param groups' current settings."""
        return Update(params, grads, [{k: v for k, v in self.group_of[p].items() if k != "params"} for p in params],
                      unscale=unscale)

    def verdict(self, total: tuple[float, bool]) -> tuple[str, float | None]:
        """("skip", None), ("clip", coefficient) or ("plain", None) for a step whose gradients have the squared
        norm and non-finite flag `total`."""
        squares, bad = total
        if bad or not math.isfinite(squares):
            return "skip", None
        if self.max_norm is None:
            return "plain", None
        coefficient = self.max_norm / (math.sqrt(squares) + CLIP_EPS)
        return ("clip", coefficient) if coefficient < 1.0 else ("plain", None)

    def apply(self, update: Update, scale: float | None) -> None:
        """Run the update's fused kernel with its gradients times `scale` (the clip coefficient) and unscaled."""
        grads = update.grads
        factor = (1.0 if scale is None else scale) * update.unscale
        if factor != 1.0:
            grads = torch._foreach_mul([g.detach() for g in grads], factor)
        with torch.no_grad():
            buckets: dict[int, list[int]] = {}
            for j, p in enumerate(update.params):
                buckets.setdefault(id(self.group_of[p]), []).append(j)
            for js in buckets.values():
                params = [update.params[j] for j in js]
                states = [self.optimizer.state[p] for p in params]
                self.kernel(params, [grads[j] for j in js], states, update.groups[js[0]])
        update.applied = True

    def backup(self, update: Update) -> None:
        update.backup = take_backup(self._spares, self.optimizer, update.params)

    def restore(self, update: Update) -> None:
        """Put the update's parameters and optimizer state back as its backup holds them."""
        sources, targets = [], []
        for p, ((value, tensors), others) in zip(update.params, update.backup):
            sources.append(value)
            targets.append(p.detach())
            if others is None:  # the step created the state: without it, the parameter never stepped
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for k, v in tensors.items():
                sources.append(v)
                targets.append(state[k])
            state.update(others)
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)
        update.applied = False


def take_backup(spares: dict, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list:
    """Copy parameters and their optimizer state into buffers kept from step to step (`spares`), in one
    multi-tensor copy; returns per parameter ((parameter copy, state tensor copies), other state or None)."""
    sources, targets, backup = [], [], []
    for p in params:
        state = optimizer.state.get(p) or {}
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        spare = spares.get(p)
        if spare is None or spare[1].keys() != tensors.keys():
            spare = spares[p] = (torch.empty_like(p), {k: torch.empty_like(v) for k, v in tensors.items()})
        sources += [p.detach(), *tensors.values()]
        targets += [spare[0], *spare[1].values()]
        backup.append((spare, {k: v for k, v in state.items() if k not in tensors} if state else None))
    with torch.no_grad():
        torch._foreach_copy_(targets, sources)
    return backup


def updated_scale(state: dict, found_inf: bool) -> dict:
    """A GradScaler's state_dict after `scaler.update()` of a step that found (or not) a non-finite gradient:
    torch's _amp_update_scale_, the scale held in float32 (backoff at once; growth after `growth_interval` clean
    steps in a row, unless the grown scale is not finite)."""
    scale, tracker = state["scale"], state["_growth_tracker"]
    if found_inf:
        scale, tracker = _float32(scale * state["backoff_factor"]), 0
    elif tracker + 1 == state["growth_interval"]:
        grown = _float32(scale * state["growth_factor"])
        scale, tracker = (grown if math.isfinite(grown) else scale), 0
    else:
        tracker += 1
    return {**state, "scale": scale, "_growth_tracker": tracker}


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).float())
