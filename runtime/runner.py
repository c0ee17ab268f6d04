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
from zb.runtime.optimizer import OptimizerStep, synchronize
from zb.runtime.profile import measured_costs, measured_timeline, modelled_costs
from zb.schedules import Action, Costs, F, Schedule, Timeline, generate, lower


def sequential_schedule(microbatches: int, training: bool) -> Schedule:
    """One stage on one rank: F, B, W for each microbatch in turn."""
    kinds = ("F", "B", "W") if training else ("F",)
    actions = tuple(Action(0, k, mb) for mb in range(microbatches) for k in kinds)
    return Schedule("sequential", microbatches, (0,), (actions,))


def forward_only(schedule: Schedule) -> Schedule:
    acts = tuple(tuple(a for a in rank if a.kind == F) for rank in schedule.actions)
    return Schedule(schedule.name, schedule.num_microbatches, schedule.placement, acts)


REPLAN_AFTER = 2  # zb-auto re-plans with the costs measured in this step (the first one warms caches up)
MEASURE_REPEAT = 3  # in the first step measured for re-cutting, each piece runs this often; the quickest counts


class PipelineRunner:
    def __init__(self, plan: Plan, compiled: dict[tuple[int, str], CompiledPiece], schedule: Schedule,
                 ranks: Sequence[int], transport, group=None, distributed: bool = False,
                 measure_first: bool = False):
        """`measure_first`: time the first step (every rank's actions), so the stages can be re-cut after it."""
        self.plan = plan
        self.schedule = schedule if plan.training else forward_only(schedule)
        self.distributed = distributed
        self.group = group
        self.ranks = list(ranks)
        self.executor = StepExecutor(plan, compiled, lower(self.schedule), ranks, transport)
        self.steps = 0
        self.measure_first = measure_first
        self.last_grads: list[torch.Tensor | None] | None = None  # what backward hands out for the last step
        self.rebalanced = False  # set by the backend once it rebuilt the plan with this runner's measurements
        self.trace: list[tuple[int, str, float, float]] = []  # every rank's actions in the last profiled step
        self.costs = None  # costs measured in the last profiled step
        self.quickest: dict = {}  # (stage, kind) -> quickest of repeated runs per action, in a measured first step
        self.optimizer = None  # the fused update and its validation, with options["optimizer"]
        if plan.training and plan.options.optimizer is not None:
            self.optimizer = OptimizerStep(plan, self.schedule, ranks, transport, distributed, group)

    def stage_times(self) -> tuple[float, ...] | None:
        """Measured F+B+W seconds per stage (from the last profiled step), or None: the quickest of each piece
        over the microbatches, what the stage costs undisturbed (the first step's first microbatches are slowed
        by first-touch memory, a peer still compiling, or the machine's other work)."""
        if self.costs is None:
            return None
        if self.quickest:  # the first step: every piece was run MEASURE_REPEAT times
            return tuple(sum(min(times) for (stage, _), times in self.quickest.items() if stage == s)
                         for s in range(self.plan.num_stages))
        quickest = measured_costs(self.trace, self.plan, self.executor.counted, statistic=min)
        return tuple(f + b + w for f, b, w in zip(quickest.f, quickest.b, quickest.w))

    def modelled_costs(self) -> Costs:
        """The plan's activation memory per stage with unit times: what the simulator needs to predict memory."""
        return modelled_costs(self.plan, self.executor.counted)

    def measured_timeline(self) -> Timeline:
        """The last profiled step as a Timeline (real start and end of every action on every rank)."""
        if not self.trace:
            raise ZbError("no step was profiled; compile with options={'profile': True}")
        return measured_timeline(self.trace, self.schedule, self.costs)

    def __call__(self, *args: Any) -> Any:
        if self.optimizer is not None:
            return self._optimizer_step(args)
        if self.plan.training:
            return _TrainingStep.apply(self, *args)
        if self.plan.options.optimizer is not None:
            synchronize(self.plan.options.optimizer)  # evaluate validated parameters
        with torch.no_grad():
            outputs, _ = self.run(args)
        return outputs

    def _optimizer_step(self, args: Sequence[Any]) -> tuple:
        """A whole training step, update included: returns the outputs, the loss detached."""
        with torch.no_grad():
            self.optimizer.begin(args)
            outputs, grads = self.run(args)
            self.optimizer.finish(grads)
        loss = outputs[0].detach()
        return (torch.Tensor._make_subclass(StepLoss, loss), *outputs[1:])

    def run(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        measuring = self.measure_first and self.steps == 0 and self.plan.training
        with torch.no_grad():
            if measuring and self.distributed:
                self._wait_for_every_rank()  # no peer still compiling while this step is timed
            self.executor.repeat = MEASURE_REPEAT if measuring else 1
            outs, grads = self.executor.run(
                args, on_stage_done=self.optimizer.stage_done if self.optimizer is not None else None)
            self.executor.repeat = 1
            m = self.plan.options.microbatches
            outputs, combined = combine(outs, grads, self.plan, m)
            if self.distributed:
                outputs = self._broadcast_outputs(outputs)
                self._sum_shared_gradients(combined)
            self.steps += 1
            replan = self.plan.training and self.schedule.name == "zb-auto" and self.steps == REPLAN_AFTER
            first = self.measure_first and self.steps == 1
            if self.plan.training and (self.plan.options.profile or replan or first):
                self._profile(replan)
            self.last_grads = combined
        return outputs, combined

    def _profile(self, replan: bool) -> None:
        trace, quickest = self.executor.trace, self.executor.quickest
        if self.distributed:
            import torch.distributed as dist

            everyone: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(everyone, (trace, quickest), group=self.group)
            trace = [record for records, _ in everyone for record in records]
            quickest = {key: times for _, theirs in everyone for key, times in theirs.items()}
        self.trace, self.quickest = trace, quickest
        self.costs = measured_costs(trace, self.plan, self.executor.counted)
        if replan:
            self._install(self._replanned(self.costs))

    def _replanned(self, costs: Costs) -> Schedule:
        """zb-auto for the measured costs, planned on one rank (its time budget could differ between ranks)."""
        options = self.plan.options
        schedule = None
        if not self.distributed or self.ranks[0] == 0:
            schedule = generate("zb-auto", self.plan.num_stages, options.microbatches, costs, options.memory_limit)
        if self.distributed:
            import torch.distributed as dist

            box = [schedule]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                       group=self.group)
            schedule = box[0]
        return schedule

    def _install(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.executor.schedule = lower(schedule)
        if self.optimizer is not None:
            self.optimizer.set_schedule(schedule)

    def _wait_for_every_rank(self) -> None:
        """A barrier with the pipeline's timeout (a dead peer is an error, not a hang)."""
        import torch.distributed as dist

        work = dist.all_reduce(torch.zeros(1), group=self.group, async_op=True)
        self.executor.transport.wait(work, "waiting for every rank to finish compiling")

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


class StepLoss(torch.Tensor):
    """The loss of a step zb already finished, update included (options["optimizer"]): a detached tensor whose
    backward() says why there is nothing left to do."""

    def backward(self, *args: Any, **kwargs: Any) -> None:
        raise ZbError(
            "this loss comes from a zb training step that already ran the backward and the optimizer update "
            "(options['optimizer']); do not call loss.backward() or optimizer.step(): call the model again for "
            "the next step, or compile without 'optimizer' to run backward and the optimizer yourself"
        )


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

