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


def combine_outputs(outs: list[list[Any]], microbatches: int) -> list[Any]:
    """Scalars (the loss) are averaged over microbatches; other tensors are concatenated along dim 0."""
    combined = []
    for values in outs:
        if not values:
            combined.append(None)
            continue
        first = values[0]
        if not isinstance(first, torch.Tensor):
            combined.append(first)
        elif first.dim() == 0:
            combined.append(first if microbatches == 1 else torch.stack(values).sum() / microbatches)
        else:
            combined.append(first if microbatches == 1 else torch.cat(values))
    return combined
