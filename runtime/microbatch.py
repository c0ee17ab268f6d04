"""Splitting a batch into microbatches (runtime/combine.py puts their outputs back together), and a checksum of a
batch that tells two ranks handed different batches apart."""

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

