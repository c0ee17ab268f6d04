"""How the step's outputs are put back together from the parts of its batch, by one table of rules for every kind
of part: the microbatches of a replica, the replicas of one process, the replicas of a replica group (there the
scalar outputs only: runtime/replicas.py).

passes/normalize_loss.py gives each output its rule (`LossProgram.outputs`); `output_rules` resolves them once
per program and `combine` applies them, part by part:

    "mean"          a scalar averaged over the parts (each part holds as many samples)
    "sum"           added
    ("ratio", d)    weighted by each part's denominator d (a token count) over their total: a part with nothing
                    to count adds nothing, although its own value is 0/0 (NaN); with nothing to count anywhere the
                    result is 0/0, NaN, as eager's token mean of a batch without tokens
    ("concat", dim) joined along `dim` in part order
    "first"         the same in every part (a constant, or computed from no batched input)

The loss's rule "loss" becomes "mean" when the parts' losses are means (loss mode "mean", each seeded 1/n) and
"sum" when they are already weighted or meant to be added. Parts nest: a replica's outputs are its microbatches'
combined, and the replicas' combine the same way, which equals one combination over every microbatch because
every replica splits its batch alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zb.codegen.program import Program, TensorSpec

Rule = Any  # "mean", "sum", ("ratio", d), ("concat", dim) or "first"


def output_rules(program: Program) -> list[Rule]:
    """Each output's rule, "loss" resolved by the loss mode. Without a loss program (a program built by hand):
    scalars averaged, other tensors concatenated along dim 0."""
    loss = program.loss
    if loss is None:
        return ["mean" if spec is not None and not spec.shape else ("concat", 0) for spec in program.outputs]
    resolved = "mean" if loss.mode == "mean" else "sum"
    return [resolved if rule == "loss" else rule for rule in loss.outputs]


def combined_shape(spec: TensorSpec, rule: Rule, parts: int) -> tuple[int, ...]:
    """The shape of an output combined over `parts` parts whose each has `spec`'s shape."""
    shape = list(spec.shape)
    if isinstance(rule, tuple) and rule[0] == "concat":
        shape[rule[1]] *= parts
    return tuple(shape)


def combine(values: Sequence[Sequence[Any]], rules: Sequence[Rule],
            counts: Sequence[Sequence[Any]] | None = None) -> list[Any]:
    """The outputs over all parts: `values[j]` is output j's value in each part, in part order (empty: this process
    did not produce it, giving None); `counts[p][d]` is part p's denominator d (a number or a scalar tensor),
    needed by the ratio rules."""
    return [_combine(list(parts), rule, counts) if parts else None for parts, rule in zip(values, rules)]


def _combine(values: list[Any], rule: Rule, counts: Sequence[Sequence[Any]] | None) -> Any:
    first = values[0]
    if not isinstance(first, torch.Tensor) or len(values) == 1 or rule == "first":
        return first
    if rule == "mean":
        assert first.is_floating_point() or first.is_complex(), f"a mean of {first.dtype} values"
        return (torch.stack(values).sum() / len(values)).to(first.dtype)
    if rule == "sum":
        return torch.stack(values).sum().to(first.dtype)
    if rule[0] == "concat":
        return torch.cat(values, dim=rule[1])
    # ("ratio", d): sum over parts of value * count, over the counts' sum, in float32 at least
    dtype = torch.promote_types(first.dtype, torch.float32)
    weights = torch.stack([torch.as_tensor(c[rule[1]], dtype=torch.float64).to(first.device, dtype) for c in counts])
    stacked = torch.stack(values).to(dtype)
    return (torch.where(weights == 0, 0, stacked * weights).sum() / weights.sum()).to(first.dtype)
