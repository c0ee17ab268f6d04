"""Single-process execution of a plan: split the batch, run F, B, W per microbatch, combine the results.

The whole training step (forward and backward of every microbatch) runs when the compiled function is called,
because a pipeline schedule interleaves forwards and backwards of different microbatches. The backward starts
from d(loss)/d(loss) = 1; `_TrainingStep.backward` scales the accumulated gradients by the gradient that
actually arrives, which is exact for a scalar loss. Values are freed as soon as no later piece of the
microbatch reads them, so activations live from F to B (or W) as the schedule dictates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from zb.codegen import CompiledPiece
from zb.passes.plan import PIECES, InputSpec, Plan

from zb.errors import ZbError


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


class MicrobatchRunner:
    """Runs one plan's compiled pieces in F, B, W order for each microbatch of a call."""

    def __init__(self, plan: Plan, compiled: dict[tuple[int, str], CompiledPiece]):
        if len(plan.stages) != 1:
            raise ZbError("the single-process runner executes one stage; multi-stage plans need a schedule")
        self.plan = plan
        self.pieces = [compiled[(0, name)] for name in PIECES if (0, name) in compiled]
        if not plan.training:
            self.pieces = self.pieces[:1]
        self.drop_after = _last_uses(self.pieces)

    def __call__(self, *args: Any) -> Any:
        if self.plan.training:
            return _TrainingStep.apply(self, *args)
        with torch.no_grad():
            outputs, _ = self.run(args)
        return outputs

    def run(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        """Run every microbatch; returns (combined outputs, gradient per graph input or None)."""
        plan, m = self.plan, self.plan.options.microbatches
        per_mb = split_microbatches(plan.inputs, args, m)
        outs: list[list[Any]] = [[] for _ in range(plan.num_outputs)]
        grads: dict[int, list[torch.Tensor]] = {}
        for inputs in per_mb:
            env = {spec.key: value for spec, value in zip(plan.inputs, inputs)}
            for piece in self.pieces:
                self._run_piece(piece, env, outs, grads)
                if piece.name == "forward" and plan.training:
                    # The loss is the mean over microbatches, so each microbatch's loss gets 1/m.
                    env["tangent:0"] = torch.full_like(outs[0][-1], 1.0 / m)
        return _combine_outputs(outs, m), self._combine_grads(grads)

    def _run_piece(self, piece: CompiledPiece, env: dict, outs: list, grads: dict) -> None:
        results = piece([env[k] for k in piece.inputs])
        for key, value in zip(piece.outputs, results):
            kind, _, name = key.partition(":")
            if kind == "out":
                outs[int(name)].append(value)
            elif kind == "grad":
                grads.setdefault(int(name), []).append(value)
            env[key] = value
        for key in self.drop_after[piece.name]:
            env.pop(key, None)

    def _combine_grads(self, grads: dict[int, list[torch.Tensor]]) -> list[torch.Tensor | None]:
        combined: list[torch.Tensor | None] = [None] * len(self.plan.inputs)
        for index, values in grads.items():
            if self.plan.inputs[index].batched:
                combined[index] = torch.cat(values) if len(values) > 1 else values[0]
            else:
                total = values[0]
                for v in values[1:]:
                    total = total + v
                combined[index] = total
        return combined


class _TrainingStep(torch.autograd.Function):
    """Connects a whole zb training step to autograd: forward runs it, backward hands out its gradients."""

    @staticmethod
    def forward(ctx, runner: MicrobatchRunner, *args: Any):
        outputs, grads = runner.run(args)
        ctx.grads = grads
        ctx.mark_non_differentiable(*(o for o in outputs[1:] if isinstance(o, torch.Tensor)))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *unused: Any):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise ZbError(
                "backward through a zb training step ran twice; each call of the compiled function computes "
                "gradients for one backward"
            )
        exact_one = bool((grad_loss == 1).all())
        return (None, *[g if g is None or exact_one else g * grad_loss for g in grads])


def _combine_outputs(outs: list[list[Any]], microbatches: int) -> list[Any]:
    combined = []
    for values in outs:
        first = values[0]
        if not isinstance(first, torch.Tensor):
            combined.append(first)
        elif first.dim() == 0:  # a loss or another per-microbatch scalar: the mean over microbatches
            combined.append(first if microbatches == 1 else torch.stack(values).sum() / microbatches)
        else:
            combined.append(first if microbatches == 1 else torch.cat(values))
    return combined


def _last_uses(pieces: list[CompiledPiece]) -> dict[str, list[str]]:
    """For each piece, the keys no later piece of the same microbatch reads: freed right after it runs."""
    drop: dict[str, list[str]] = {}
    for i, piece in enumerate(pieces):
        later = {k for p in pieces[i + 1:] for k in p.inputs}
        produced_or_read = set(piece.inputs) | set(piece.outputs)
        drop[piece.name] = sorted(k for k in produced_or_read if k not in later)
    return drop
