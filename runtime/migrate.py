"""Moving parameters between ranks when the stages are re-cut after the first training step (option `rebalance`).

A rank holds the current value of a parameter or buffer only if one of its stages reads it (the optimizer steps a
parameter only where it gets a gradient). When a re-cut gives a rank a stage part it did not have, the rank that
owned it sends, for every parameter and buffer that changes hands, its value and (for a parameter with a
gradient) the gradient of the step just run; the receiver copies the value into its own tensor and its `backward`
hands out that gradient, while ranks that no longer read a parameter hand out none. Re-cutting happens after the
first step's forward and backward, before the user's first `optimizer.step()`, so no optimizer state exists yet
that would have to move.

Every rank computes the same list of moves from the two plans; per (sender, receiver) pair and dtype the tensors
travel as one flat message.

    old: stage 0 on rank 0 reads w0, w1; stage 1 on rank 1 reads w2
    new: stage 0 reads w0;               stage 1 reads w1, w2
    moves: w1 (value and gradient) rank 0 -> rank 1; rank 0's backward no longer returns w1's gradient
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zb.passes.plan import Plan, output_keys
from zb.runtime.transport import control_tag

MIGRATE = 16  # control kinds from here on: one per message of a migration


@dataclass(frozen=True)
class Move:
    index: int  # the plan input (parameter or buffer)
    src: int  # pipeline rank that holds its value
    dst: int  # pipeline rank that reads it from now on
    with_grad: bool  # the gradient of the step just run travels too


def readers(plan: Plan, placement: Sequence[int]) -> dict[int, set[int]]:
    """Plan input index -> the pipeline ranks whose stages read it."""
    found: dict[int, set[int]] = defaultdict(set)
    for stage in plan.stages:
        for node in stage.graph.graph.find_nodes(op="placeholder"):
            key = node.meta["zb_key"]
            if key.startswith("in:"):
                found[int(key[3:])].add(placement[stage.index])
    return found


def gradient_inputs(plan: Plan) -> set[int]:
    """Plan inputs some stage's backward produces a gradient for."""
    return {int(k[8:]) for stage in plan.stages for gm in (stage.backward_input, stage.backward_weight)
            if gm is not None for k in output_keys(gm) if k and k.startswith("grad:in:")}


def moves(old: Plan, old_placement: Sequence[int], new: Plan, new_placement: Sequence[int]) -> list[Move]:
    """What must travel for `new` to run where `old` ran; the same list on every rank."""
    before, after = readers(old, old_placement), readers(new, new_placement)
    with_grad = gradient_inputs(old)
    result = []
    for index, spec in enumerate(old.inputs):
        if spec.kind not in ("parameter", "buffer") or not before.get(index):
            continue
        src = min(before[index])
        for dst in sorted(after.get(index, set()) - before[index]):
            result.append(Move(index, src, dst, index in with_grad))
    return result


def migrate(planned: list[Move], rank: int, transport, values: Sequence[torch.Tensor],
            grads: list[torch.Tensor | None], old: Plan, old_placement: Sequence[int], new: Plan,
            new_placement: Sequence[int]) -> None:
    """Carry out `planned` on pipeline rank `rank`: send what it owns, receive what it gains (values copied into
    `values`, gradients put into `grads`), and drop the gradients of parameters it no longer reads."""
    messages: dict[tuple[int, int, torch.dtype], list[tuple[Move, str]]] = defaultdict(list)
    for move in planned:
        spec = old.example_inputs[move.index]
        messages[(move.src, move.dst, spec.dtype)].append((move, "value"))
        if move.with_grad:
            messages[(move.src, move.dst, spec.dtype)].append((move, "grad"))
    posted = []
    for number, ((src, dst, dtype), parts) in enumerate(sorted(messages.items(), key=lambda kv: kv[0][:2])):
        tag = control_tag(MIGRATE + number)
        if src == rank:
            flat = torch.cat([_part(move, what, values, grads).detach().reshape(-1) for move, what in parts])
            transport.send(tag, [flat], dst)
        elif dst == rank:
            numel = sum(old.example_inputs[move.index].numel() for move, _ in parts)
            posted.append((transport.recv(tag, [((numel,), dtype)], src)[0], parts))
    for flat, parts in posted:
        offset = 0
        for move, what in parts:
            target = values[move.index]
            piece = flat[offset: offset + target.numel()].view(target.shape)
            offset += target.numel()
            if what == "value":
                with torch.no_grad():
                    target.copy_(piece)
            else:
                grads[move.index] = piece.clone()
    transport.finish()
    before, after = readers(old, old_placement), readers(new, new_placement)
    for index in before:
        if rank in before[index] and rank not in after.get(index, set()):
            grads[index] = None


def _part(move: Move, what: str, values, grads) -> torch.Tensor:
    if what == "value":
        return values[move.index]
    grad = grads[move.index]
    return grad if grad is not None else torch.zeros_like(values[move.index])
