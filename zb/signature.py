"""A call's input signature: the key its pipeline is cached under, and how its inputs are split.

The key holds each input's shape, dtype, device and requires_grad (a non-tensor's value), named by the Dynamo source
it was read from, with the caller's autocast state. What Dynamo baked into the graph (flags, `module.training`,
Python constants) is fixed per graph by its guards, so the graph's cache is too (zb/plan_cache.py). A pipeline built
with sizes symbolic (option symbolic_sizes) is keyed with those dims left out and serves a call its shape guards
admit:

    exact:    (True, autocast, ("L['x']", ((8, 12), torch.int64, "cpu", False)), ...)
    generic:  (True, autocast, ("L['x']", ((8, None), torch.int64, "cpu", False)), ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from zb.autocast import autocast_state
from zb.core.errors import ZbError, ZbOptionError
from zb.core.options import Options
from zb.passes import InputSpec
from zb.plan_cache import Entry, PlanCache


class Signatures:
    """Names each call's input signature and finds the cached pipeline that serves it."""

    def __init__(self, gm: fx.GraphModule, inputs: list[InputSpec], options: Options, cache: PlanCache):
        self.placeholders = gm.graph.find_nodes(op="placeholder")
        self.inputs = inputs
        self.options = options
        self.cache = cache

    def lookup(self, args: Sequence[Any], training: bool, symbolic: bool) -> tuple[tuple, Entry | None, dict]:
        """(the cache key, its entry or None, the dims to trace symbolic when building one). A pipeline built for
        this exact signature serves first; else, when Dynamo made sizes dynamic and `symbolic` pipelines are
        wanted, the symbolic pipeline of the signature with those sizes left out, if its shape guards admit this
        call's sizes; one that does not gets a pipeline of its own, at these sizes."""
        exact = self.key(args, training)
        entry = self.cache.get(exact)
        dims = self._dynamic_dims(args) if entry is None and symbolic else {}
        if not dims:
            return exact, entry, {}
        generic = self.key(args, training, dims)
        entry = self.cache.get(generic)
        if entry is None:
            return generic, None, dims
        if entry.guards is not None and entry.guards([args[i] for i in self.arg_map(entry)]):
            return generic, entry, dims
        return exact, None, {}

    def key(self, args: Sequence[Any], training: bool, generic: dict[int, list[int]] | None = None) -> tuple:
        """The call's signature; the sizes a dynamic graph takes as arguments are left out (the tensors' shapes say
        them), and so are the `generic` dims (position -> dims) of a symbolic pipeline."""
        generic = generic or {}
        named = ((spec.source, _signature(value, generic.get(spec.index, ()))) for spec, value in zip(self.inputs, args)
                 if isinstance(value, torch.Tensor) or not is_size(spec.source))
        autocast = tuple(sorted((device, enabled, str(dtype)) for device, (enabled, dtype) in autocast_state().items()))
        return (training, autocast, *sorted(named, key=lambda item: item[0]))

    def arg_map(self, entry: Entry) -> list[int]:
        """The position among this graph's arguments of each of the entry's plan inputs."""
        position = {spec.source: spec.index for spec in self.inputs}
        missing = [source for source in entry.sources if source not in position]
        if missing:
            raise ZbError(f"a pipeline built for this function reads inputs this graph of it does not: {missing}")
        return [position[source] for source in entry.sources]

    def sources(self, arg_map: list[int]) -> list[str]:
        """The Dynamo source of each of a plan's inputs, given their positions among this graph's arguments."""
        return [self.inputs[i].source for i in arg_map]

    def _dynamic_dims(self, args: Sequence[Any]) -> dict[int, list[int]]:
        """Per user input (position in this graph), the dims Dynamo made symbolic, but the batch dim of a split
        input (each microbatch has a fixed size)."""
        dims = {}
        for spec, node in zip(call_specs(self.inputs, args, self.options.unbatched), self.placeholders):
            value = node.meta.get("example_value")
            if spec.kind == "input" and isinstance(value, torch.Tensor):
                symbolic = [d for d in range(value.dim()) if isinstance(value.shape[d], torch.SymInt)
                            and not (d == 0 and spec.batched)]
                if symbolic:
                    dims[spec.index] = symbolic
        return dims


def call_specs(inputs: list[InputSpec], args: Sequence[Any], unbatched: tuple[str, ...] | None) -> list[InputSpec]:
    """The graph's inputs as this call passes them: whether each requires grad, and which user inputs are split into
    microbatches along dim 0: those whose dim 0 is the batch size (the size most tensor arguments share), unless
    named in option 'unbatched'. Inputs with another dim 0 (a [1, L] position tensor, a shared [L, L] mask) and
    scalars are passed whole to every microbatch."""
    specs = [replace(s, requires_grad=isinstance(a, torch.Tensor) and a.requires_grad) for s, a in zip(inputs, args)]
    named = set(unbatched or ())
    known = {s.name for s in specs if s.kind == "input"}
    if named - known:
        raise ZbOptionError(f"option 'unbatched' names {sorted(named - known)}, which the compiled function does not "
                            f"take as tensor arguments; its tensor arguments are {sorted(known)}")
    candidates = [s for s in specs if s.batched and s.name not in named and args[s.index].shape[0] != 1]
    sizes = {s.name: args[s.index].shape[0] for s in candidates}
    if len(set(sizes.values())) > 1:
        raise ZbOptionError(
            f"zb cannot tell the batch size: the tensor arguments have dim 0 of sizes {sizes}; name the arguments "
            "that are not split into microbatches (passed whole to each) with options={'unbatched': [...]}")
    return [replace(s, batched=s in candidates) for s in specs]


def is_size(source: str) -> bool:
    """A graph input Dynamo reads from a tensor's shape (a dynamic graph's sizes): L['x'].size()[1], ..."""
    return any(part in source for part in (".size()", ".stride()", ".storage_offset()"))


def _signature(value: Any, generic: Sequence[int] = ()) -> Any:
    """A tensor's shape (None at the `generic` dims), dtype, device and requires_grad; anything else itself."""
    if isinstance(value, torch.Tensor):
        shape = tuple(None if d in generic else size for d, size in enumerate(value.shape))
        return (shape, value.dtype, value.device.type, value.requires_grad)
    return value
