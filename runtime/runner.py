"""What the compiled function runs: one step of the plan's schedule, connected to autograd.

The whole training step (forward and backward of every microbatch, in the schedule's order) runs when the
compiled function is called, because a pipeline interleaves forwards and backwards of different microbatches.
The backward starts from d(loss)/d(loss) = 1; `loss.backward()` then hands out the accumulated gradients scaled
by the gradient that arrives, exact for a scalar loss. Under torch.distributed every rank returns the same
outputs (broadcast from the rank of the last stage) and gets gradients only for the parameters its stages read
(a parameter read on several ranks, like tied embeddings, has its gradient summed across them).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch

from zb.codegen import CompiledPiece
from zb.errors import ZbError
from zb.passes.plan import Plan, output_keys
from zb.runtime.executor import StepExecutor, combine
from zb.schedules import F, Action, Schedule, lower


def sequential_schedule(microbatches: int, training: bool) -> Schedule:
    """One stage on one rank: F, B, W for each microbatch in turn."""
    kinds = ("F", "B", "W") if training else ("F",)
    actions = tuple(Action(0, k, mb) for mb in range(microbatches) for k in kinds)
    return Schedule("sequential", microbatches, (0,), (actions,))


def forward_only(schedule: Schedule) -> Schedule:
    acts = tuple(tuple(a for a in rank if a.kind == F) for rank in schedule.actions)
    return Schedule(schedule.name, schedule.num_microbatches, schedule.placement, acts)


class PipelineRunner:
    def __init__(self, plan: Plan, compiled: dict[tuple[int, str], CompiledPiece], schedule: Schedule,
                 ranks: Sequence[int], transport, group=None, distributed: bool = False):
        self.plan = plan
        self.schedule = schedule if plan.training else forward_only(schedule)
        self.lowered = lower(self.schedule)
        self.distributed = distributed
        self.group = group
        self.ranks = list(ranks)
        self.executor = StepExecutor(plan, compiled, self.lowered, ranks, transport)

    def __call__(self, *args: Any) -> Any:
        if self.plan.training:
            return _TrainingStep.apply(self, *args)
        with torch.no_grad():
            outputs, _ = self.run(args)
        return outputs

    def run(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        with torch.no_grad():
            outs, grads = self.executor.run(args)
            m = self.plan.options.microbatches
            outputs, combined = combine(outs, grads, self.plan, m)
            if self.distributed:
                outputs = self._broadcast_outputs(outputs)
                self._sum_shared_gradients(combined)
        return outputs, combined

    @property
    def last_rank(self) -> int:
        return self.schedule.placement[self.plan.num_stages - 1]

    def _broadcast_outputs(self, outputs: list[Any]) -> list[Any]:
        import torch.distributed as dist

        last = self.plan.stages[-1].forward
        m = self.plan.options.microbatches
        vals = _output_vals(last)
        src = dist.get_global_rank(self.group, self.last_rank) if self.group is not None else self.last_rank
        result = []
        for j, val in enumerate(vals):
            shape = tuple(val.shape) if val.dim() == 0 else (val.shape[0] * m, *val.shape[1:])
            tensor = outputs[j] if outputs[j] is not None else torch.empty(shape, dtype=val.dtype)
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=src, group=self.group)
            result.append(tensor)
        return result

    def _sum_shared_gradients(self, grads: list[torch.Tensor | None]) -> None:
        """Parameters read by stages on several ranks (tied weights): every such rank gets the summed gradient."""
        import torch.distributed as dist

        for index, ranks in _shared_parameters(self.plan, self.schedule).items():
            value = grads[index]
            mine = value is not None
            shape = self.plan.example_inputs[index].shape
            buffer = value.clone() if mine else torch.zeros(shape, dtype=self.plan.example_inputs[index].dtype)
            dist.all_reduce(buffer, group=self.group)
            if self.ranks[0] in ranks:
                grads[index] = buffer


def _output_vals(gm) -> list[torch.Tensor]:
    (out,) = gm.graph.find_nodes(op="output")
    keys = output_keys(gm)
    return [node.meta["val"] for key, node in zip(keys, out.args[0]) if key is not None and key.startswith("out:")]


def _shared_parameters(plan: Plan, schedule: Schedule) -> dict[int, set[int]]:
    """Parameter index -> the ranks whose stages produce its gradient, for parameters on more than one rank."""
    owners: dict[int, set[int]] = {}
    for stage in plan.stages:
        for gm in (stage.backward_weight, stage.backward_input):
            for key in (output_keys(gm) if gm is not None else []):
                if key.startswith("grad:in:") and plan.inputs[int(key[8:])].kind == "parameter":
                    owners.setdefault(int(key[8:]), set()).add(schedule.placement[stage.index])
    return {i: r for i, r in sorted(owners.items()) if len(r) > 1}


class _TrainingStep(torch.autograd.Function):
    """Connects a whole zb training step to autograd: forward runs it, backward hands out its gradients."""

    @staticmethod
    def forward(ctx, runner: PipelineRunner, *args: Any):
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

