"""Splitting a batch into microbatches and putting per-microbatch results back together."""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch

from zb.core.errors import ZbError
from zb.codegen.program import InputSpec


def split_microbatches(specs: Sequence[InputSpec], args: Sequence[Any], microbatches: int) -> list[list[Any]]:
    """Per microbatch, the graph inputs: batched tensors chunked along dim 0, everything else shared."""
    per_mb: list[list[Any]] = [[] for _ in range(microbatches)]
    for spec, value in zip(specs, args):
        if spec.batched:
            size = value.shape[0]
            if size % microbatches:
                raise ZbError(
                    f"input {spec.name!r} has batch size {size}, which microbatches={microbatches} does not "
                    f"divide; use a batch size that is a multiple of {microbatches} or change 'microbatches'"
                )
            chunks = value.chunk(microbatches, dim=0) if microbatches > 1 else (value,)
        else:
            chunks = (value,) * microbatches
        for mb, chunk in enumerate(chunks):
            per_mb[mb].append(chunk)
    return per_mb


def fingerprint(specs: Sequence[InputSpec], args: Sequence[Any]) -> torch.Tensor:
    """A cheap checksum of each batched tensor argument (float64): its size and a position-weighted sum of at most
    4096 evenly spaced elements. Two ranks handed different batches disagree here with near certainty."""
    sums = []
    for spec, value in zip(specs, args):
        if spec.batched and isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].double()
            weights = torch.arange(1, sample.numel() + 1, dtype=torch.float64, device=sample.device)
            sums.append((sample * weights).sum() + flat.numel())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)


def combine_outputs(outs: list[list[Any]], microbatches: int, rules: Sequence[Any] | None = None,
                    loss_mode: str = "mean", denominators: list[list[torch.Tensor]] | None = None) -> list[Any]:
    """Each output's microbatch values combined by its rule (passes/normalize_loss.py): "loss" (averaged, or
    added when the microbatch losses are already weighted), "mean", "sum", ("ratio", d) (weighted by denominator
    d of each microbatch over its total), ("concat", dim), "first" (the same in every microbatch).
    Without rules: scalars averaged, other tensors concatenated along dim 0."""
    combined = []
    for j, values in enumerate(outs):
        if not values:
            combined.append(None)
            continue
        first = values[0]
        rule = rules[j] if rules is not None else ("mean" if isinstance(first, torch.Tensor) and first.dim() == 0
                                                   else ("concat", 0))
        if rule == "loss":
            rule = "mean" if loss_mode == "mean" else "sum"
        if not isinstance(first, torch.Tensor) or microbatches == 1 or rule == "first":
            combined.append(first)
        elif rule == "sum":
            combined.append(torch.stack(values).sum())
        elif rule == "mean":
            combined.append(torch.stack(values).sum() / microbatches)
        elif rule[0] == "concat":
            combined.append(torch.cat(values, dim=rule[1]))
        else:  # ("ratio", d): sum_mb value_mb * d_mb / sum of d (a microbatch with nothing to count adds nothing)
            counts = torch.stack([d[rule[1]] for d in denominators]).to(first.dtype)
            values = torch.stack(values)
            combined.append(torch.where(counts == 0, 0, values * counts).sum() / counts.sum())
    return combined
