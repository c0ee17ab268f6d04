"""Parameter gradients added into the step's sums inside the piece that makes them, one gradient at a time.

With microbatches, each W (or a B that makes parameter gradients) returns the gradients of all its stage's
parameters for one microbatch, and the step adds them to its sums. Returned, they all exist at once: on top of the
sums, a second copy of the stage's gradients at every W after the first, which eager PyTorch never holds (autograd
adds each parameter's gradient into `.grad` as soon as it is made). So the piece that runs takes the sums as inputs
and adds each gradient into its sum right after making it, and that gradient is freed before the next is made:

    before:  W(saved..., stash...) -> (grad:in:3, grad:in:4)          the step: sum3 += g3; sum4 += g4
    after:   W(saved..., stash..., grad:in:3, grad:in:4) -> (None, None)
             g3 = mm(...); sum3.add_(g3); g4 = mm(...); sum4.add_(g4)

(for Inductor written `copy_(sum3, add(sum3, g3))`, an input mutation it compiles into the kernel that adds).

The sums start at zero (0 + g is g exactly), in the step's reduction dtype where mixed precision asks for one.
The plan keeps its pieces as the passes made them (what `zb check` compares with eager); codegen compiles, and the
program describes, the rewritten copy (`runnable`). A gradient with a symbolic shape stays an output (the step adds
it as before).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import fx

from zb.passes.keys import Kind, Role
from zb.passes.plan import Plan, output_keys, output_values

_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plan piece -> its runnable copy


def runnable(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """The piece as it runs: `gm` itself, or (a training plan with microbatches) a copy that adds the gradients of
    parameters and other unbatched inputs into the step's sums (placeholders keyed `grad:in:<i>`)."""
    if not plan.training or plan.options.microbatches == 1:
        return gm
    if gm not in _made:
        summed = {i for i, spec in enumerate(plan.inputs) if not spec.batched}
        new = accumulating(gm, summed, plan.options.reduce_dtype, plan.options.compiler == "eager")
        _made[gm] = None if new is gm else new  # (a value holding `gm` itself would keep it alive for good)
    return _made[gm] or gm


def accumulating(gm: fx.GraphModule, summed: set[int], reduce_dtype: torch.dtype | None, in_place: bool
                 ) -> fx.GraphModule:
    """A copy of `gm` whose outputs `grad:in:<i>` (i in `summed`, static shape) are added in place into new
    placeholders with the same keys (in `reduce_dtype` when it is set), their output slots None. `in_place`:
    as `add_` (the graph runs as it is: compiler="eager"), else as `copy_(sum, add(sum, g))`, the form of an input
    mutation Inductor compiles into one kernel writing the sum."""
    keys, values = output_keys(gm), output_values(gm)
    chosen = [j for j, (key, value) in enumerate(zip(keys, values))
              if key is not None and key.is_(Kind.IN, Role.GRAD) and key.index in summed
              and isinstance(value, fx.Node) and _static_tensor(value.meta.get("val"))]
    if not chosen:
        return gm
    new = copy.deepcopy(gm)
    graph = new.graph
    (out,) = graph.find_nodes(op="output")
    results = list(output_values(new))
    last = graph.find_nodes(op="placeholder")[-1]
    totals = {}
    for j in chosen:  # the sums' placeholders first, after the piece's own
        value, key = results[j].meta["val"], keys[j]
        dtype = reduce_dtype if reduce_dtype is not None and value.dtype.is_floating_point else value.dtype
        with graph.inserting_after(last):
            last = totals[j] = graph.placeholder(f"grad_total_{key.index}")
        last.meta.update(val=value.new_empty(value.shape, dtype=dtype), zb_key=key)
    aten = torch.ops.aten
    for j in chosen:
        grad, total = results[j], totals[j]
        if in_place and results.count(grad) == 1 and _scatter_into_zeros(grad, total):
            _scatter_into(graph, grad, total)
            results[j] = None
            continue
        # right after the gradient is made (after the last placeholder when it is one of the piece's inputs)
        with graph.inserting_after(last if grad.op == "placeholder" else grad):
            if in_place:
                added = graph.call_function(aten.add_.Tensor, (total, grad))
            else:
                added = graph.call_function(aten.add.Tensor, (total, grad))
        added.meta["val"] = total.meta["val"] if in_place else total.meta["val"] + grad.meta["val"]
        if not in_place:
            with graph.inserting_after(added):
                stored = graph.call_function(aten.copy_.default, (total, added))
            stored.meta["val"] = total.meta["val"]
        results[j] = None
    out.args = (tuple(results),)
    new.meta["zb_output_keys"] = [None if j in chosen else key for j, key in enumerate(keys)]
    new.recompile()
    return new


def _scatter_into_zeros(grad: fx.Node, total: fx.Node) -> bool:
    """Whether `grad` is an embedding's weight gradient as decomposed (rows added into a zero table that nothing
    else reads: torch._decomp's embedding_dense_backward), in the sum's dtype."""
    if grad.target is not torch.ops.aten._unsafe_masked_index_put_accumulate.default or len(grad.users) != 1:
        return False
    table = grad.args[0]
    return (isinstance(table, fx.Node) and table.target is torch.ops.aten.full.default and table.args[1] == 0
            and len(table.users) == 1 and grad.meta["val"].dtype == total.meta["val"].dtype)


def _scatter_into(graph: fx.Graph, grad: fx.Node, total: fx.Node) -> None:
    """Add the rows into the sum itself, as the decomposition adds them into its zero table (indices clamped,
    masked rows zero): eager's embedding backward holds one table, and so does this, with no second one beside
    the sum."""
    aten = torch.ops.aten
    table, mask, indices, values = grad.args
    anchor = grad

    def after(target, args, val):
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.call_function(target, args)
        anchor.meta["val"] = val
        return anchor

    keep = after(aten.bitwise_not.default, (mask,), ~mask.meta["val"])
    masked = after(aten.masked_fill.Scalar, (values, keep, 0), values.meta["val"].masked_fill(keep.meta["val"], 0))
    clamped = [None if index is None else
               after(aten.clamp.default, (index, -size, size - 1), index.meta["val"].clamp(-size, size - 1))
               for index, size in zip(indices, table.meta["val"].shape)]
    put = after(aten.index_put_.default, (total, clamped, masked, True), total.meta["val"])
    grad.replace_all_uses_with(put)  # (only the output slot, set to None by the caller)
    graph.erase_node(grad)
    graph.erase_node(table)


def _static_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape)

