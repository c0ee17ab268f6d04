"""DTensor's sharding propagation as a batch rule, for aten operations zb has no rule of its own for.

A microbatch is a contiguous chunk of the batch, exactly what DTensor calls `Shard(d)` of a tensor on a mesh: the
question "is this op per sample?" is DTensor's question "does `Shard(d)` in give `Shard(k)` out without
redistribution?". zb asks DTensor's `ShardingPropagator` that question on a 2-device mesh built without any
process group (`_init_backend=False`), so it needs no torch.distributed set-up and touches no user group.

Measured on torch 2.13 (see docs/exactness.md): the propagator answers most aten ops (softmax, cumsum, sort,
upsampling, layer norm, ...) but not `unfold`, `embedding_bag` or data-dependent ops (`nonzero` raises); its
cache keys an `OpSchema` by its tensor specs plus only the arguments its `schema_info` declares static, so the
schema must carry `op_to_schema_info[op]` (without it, softmax over dim 1 returns the cached answer for dim 0);
and it asks to redistribute a flatten of `Shard(0)` that needs none, so zb's own view rule comes first. Private
API behind the question: zb.core.torch_internals.dtensor_sharding.
"""

from __future__ import annotations

from typing import Any

import torch

from zb.core import torch_internals


def propagate(func, args, kwargs, shard: dict[int, int]) -> Any:
    """For an op whose tensor inputs are split along `shard[id(tensor)]` (absent: not split): a list with each
    output's batch dim (None: not batched), "redistribute" or "partial" when the op needs the whole batch, or
    None when DTensor has no rule for it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import Partial

    def place(a: torch.Tensor) -> Any:
        return Shard(shard[id(a)]) if id(a) in shard else Replicate()

    answer = torch_internals.dtensor_sharding(func, args, kwargs, place)
    if answer is None:  # no strategy registered, or one that cannot handle these arguments
        return None
    if answer.needs_redistribute:
        return "redistribute"
    specs = answer.output_spec if isinstance(answer.output_spec, (list, tuple)) else [answer.output_spec]
    found = []
    for s in specs:
        if s is None:
            continue
        placement = s.placements[0]
        if isinstance(placement, Partial):
            return "partial"
        found.append(placement.dim if isinstance(placement, Shard) else None)
    return found
