"""What the compiled function runs: one step of the plan's schedule on this process's pipeline ranks.

A training call runs the whole step (runtime/autograd_step.py connects it to autograd, or, with option
'optimizer', the step ends with the update). Under torch.distributed every rank returns the same outputs
(broadcast from the rank of the last stage) and gets gradients only for the parameters its stages read (a
parameter read on several ranks, like tied embeddings, has its gradient summed across them). The runner's other
jobs live beside it: data-parallel replicas (runtime/replicas.py), profiling (runtime/profiler.py), which
parameters live here (runtime/ownership.py), how outputs combine (runtime/combine.py).
"""

from __future__ import annotations

import os
import pathlib
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from zb.codegen.program import Program
from zb.core.errors import ZbError, ZbUnsupportedError
from zb.runtime.autograd_step import StepLoss, TrainingStep
from zb.runtime.combine import combine, combined_shape, output_rules
from zb.runtime.executor import StepExecutor, combine_gradients
from zb.runtime.memory import RankMemory, planned_memory
from zb.runtime.microbatch import fingerprint
from zb.runtime.optimizer import OptimizerStep, synchronize
from zb.runtime.ownership import StateOwnership
from zb.runtime.profile import modelled_costs
from zb.runtime.profiler import StepProfiler
from zb.runtime.released import zb_internal
from zb.runtime.replicas import Replicas
from zb.schedules import Action, Costs, F, Schedule, Timeline, lower


def sequential_schedule(microbatches: int, training: bool) -> Schedule:
    """One stage on one rank: F, B, W for each microbatch in turn."""
    kinds = ("F", "B", "W") if training else ("F",)
    actions = tuple(Action(0, k, mb) for mb in range(microbatches) for k in kinds)
    return Schedule("sequential", microbatches, (0,), (actions,))


def forward_only(schedule: Schedule) -> Schedule:
    acts = tuple(tuple(a for a in rank if a.kind == F) for rank in schedule.actions)
    return Schedule(schedule.name, schedule.num_microbatches, schedule.placement, acts)


# Every runner alive in this process: what checkpoints ask which parameters this process owns (zb/checkpoint.py).
LIVE: weakref.WeakSet = weakref.WeakSet()


class PipelineRunner:
    """Drives one step of a program per call: this process's ranks' actions on the call's batch, the gradient sums
    and updates they trigger, and the outputs and gradients the compiled function hands back."""

    def __init__(self, program: Program, schedule: Schedule, ranks: Sequence[int], comm, replicas: int = 1,
                 replica_comm=None, replica: int = 0):
        """`replicas` > 1: data parallelism, over `replica_comm` (this rank's replica group; this process is
        replica number `replica`), or, without it, all replicas in this process (runtime/replicas.py)."""
        self.program = program
        self.schedule = schedule if program.training else forward_only(schedule)
        self.comm = comm
        self.distributed = comm.distributed
        self.ranks = list(ranks)
        self.replicas, self.replica_comm, self.replica = replicas, replica_comm, replica
        self.data_parallel = Replicas(program, replicas, replica_comm, replica)
        self.executor = StepExecutor(program, self._lower(self.schedule), ranks, comm)
        self.executor.replicas, self.executor.replica = replicas, replica
        self.rules = output_rules(program)  # how each output combines over microbatches and replicas
        self.profiler = StepProfiler(program)
        self.ownership = StateOwnership(program, self.schedule.placement, ranks)
        self.steps = 0
        # What backward hands out for the step just run, until the step's re-cut has read it (zb/adapt.py migrate);
        # then dropped, so that no rank holds a second copy of its gradients between steps.
        self.last_grads: list[torch.Tensor | None] | None = None
        self.optimizer = None  # the fused update and its validation, with options["optimizer"]
        # Option grad_scaler of the call being run (set by the backend per call: a pipeline shared between two
        # compiled functions of one model must read the caller's scaler, not the one it was built with).
        self.grad_scaler = program.options.grad_scaler
        if program.training and program.options.optimizer is not None:
            self.optimizer = OptimizerStep(program, self.schedule, ranks, comm, replica_comm,
                                           self.data_parallel.owner, replica)
        self.state: dict[int, torch.Tensor] = {}  # input index -> the parameter or buffer of the last call
        LIVE.add(self)
        self._dump_schedule()

    def _lower(self, schedule: Schedule) -> Schedule:
        return lower(schedule, reduce=self.program.training and self.replicas > 1)

    # What the profiler measured (zb/adapt.py sets profile_steps and repeat before a step) ----------------------
    @property
    def profile_steps(self) -> set[int]:
        return self.profiler.steps

    @property
    def repeat(self) -> dict[int, int]:
        return self.profiler.repeat

    @property
    def trace(self) -> list[tuple[int, str, float, float]]:
        return self.profiler.trace

    @property
    def costs(self) -> Costs | None:
        return self.profiler.costs

    @property
    def quickest(self) -> dict:
        return self.profiler.quickest

    def stage_times(self) -> tuple[float, ...] | None:
        return self.profiler.stage_times()

    def measured_timeline(self) -> Timeline:
        return self.profiler.timeline(self.schedule)

    def modelled_costs(self) -> Costs:
        """The program's activation memory per stage with unit times: what the simulator needs to predict memory."""
        return modelled_costs(self.program)

    def planned_memory(self) -> dict[int, RankMemory]:
        """Per pipeline rank of this process: the bytes a step holds, item by item and at its peak (activations,
        boundary tensors, gradients and a running piece's working bytes; runtime/memory.py)."""
        return planned_memory(self.program, self.executor.items, self.ranks)

    # Which parameters and buffers live here (runtime/ownership.py) ------------------------------------------------
    def foreign(self, args: Sequence[Any]) -> dict[int, str]:
        return self.ownership.foreign(args)

    def release_foreign(self, args: Sequence[Any], foreign: dict[int, str]) -> int:
        return self.ownership.release_foreign(args, foreign)

    def owned(self) -> tuple[set[int], set[int]]:
        """(ids of the parameters and buffers this process's stages read, ids of those no stage reads): what a
        checkpoint of this process holds, and what every process may write (never changed by a step)."""
        return self.ownership.owned(self.state)

    # One step -----------------------------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        with zb_internal():  # the other ranks' released parameters pass through as arguments, never read
            self.ownership.check_held(args)
            return self._call(args)

    def _call(self, args: Sequence[Any]) -> Any:
        self.program.bind(args)  # a plan traced with a symbolic length: this call's shapes and bytes
        if self.optimizer is not None:
            return self._optimizer_step(args)
        if self.program.training:
            self.executor.seed_scale = self._loss_scale()
            return TrainingStep.apply(self, *args)
        if self.program.options.optimizer is not None:
            synchronize(self.program.options.optimizer)  # evaluate validated parameters
        with torch.no_grad():
            outputs, _ = self.run(args)
        return outputs

    def _loss_scale(self) -> float:
        """What the step's backward starts from: option grad_scaler's current scale (1 without one)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        if self.distributed:  # (with option 'optimizer' zb updates the scale itself, on the global verdict)
            raise ZbUnsupportedError(
                "option 'grad_scaler' works in one process for now: under torch.distributed each pipeline rank's "
                "scaler would see only its own stages' gradients when it looks for inf/NaN, so the ranks' scales "
                "could part. Give zb the optimizer too (options 'optimizer' and 'grad_scaler': zb then unscales, "
                "skips and updates the scale on the global verdict), or train in bfloat16 (no scaler needed)")
        return float(scaler.get_scale())

    def _optimizer_step(self, args: Sequence[Any]) -> tuple:
        """A whole training step, update included: returns the outputs, the loss detached."""
        with torch.no_grad():
            self.executor.seed_scale = self.optimizer.begin(args, self.grad_scaler)
            outputs, grads = self.run(args)
            self.optimizer.finish(grads)
        loss = outputs[0].detach()
        return (loss.as_subclass(StepLoss), *outputs[1:])

    def run(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        """One step on `args`: (the outputs, one gradient per input, None where this process has none)."""
        program = self.program
        number = self.steps + 1
        profiled, repeat = self.profiler.plan(number)
        with torch.no_grad():
            if self.distributed:
                self._check_one_batch(args)
            self.state = {s.index: args[s.index] for s in program.inputs if s.kind in ("parameter", "buffer")}
            self.data_parallel.check_weights(args)
            if repeat > 1 and self.distributed:
                self.comm.barrier("waiting for every rank to finish compiling")  # no peer compiling while timed
            self.executor.timed, self.executor.repeat = profiled, repeat
            if self.data_parallel.here:
                outputs, combined = self.data_parallel.run_here(self.executor, args, self.rules, self._run_prepared)
            else:
                outputs, combined = self._run_replica(args)
            self.executor.repeat = 1
            self.steps = number
            if profiled:
                self.profiler.collect(self.executor, self.comm)
            self.last_grads = combined
        return outputs, combined

    def _run_replica(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        """This process's part of the step: its ranks' actions on its batch (its replica's, with replicas)."""
        executor, replicas = self.executor, self.data_parallel
        totals = executor.prepare(args)
        counts = None
        if replicas.comm is not None:
            counts, executor.totals = replicas.global_totals(args, totals)
        outputs, combined = self._run_prepared(last=True)
        if self.distributed:
            outputs = self._broadcast_outputs(outputs)
            self._sum_shared_gradients(combined)
        if replicas.reduction is not None:
            replicas.reduction.reduce_shared(combined)
        if replicas.comm is not None:
            outputs = replicas.combine_group(outputs, self.rules, counts)
        return outputs, combined

    def _run_prepared(self, last: bool) -> tuple[list[Any], list[torch.Tensor | None]]:
        """The prepared batch's actions: (its outputs combined over microbatches, one gradient per input). `last`:
        the last replica of this process (or the only one), which completes the gradient sums and the updates."""
        executor = self.executor
        outs, grads = executor.run(None, **self._hooks(optimizer=last))
        if last:
            self._land_reductions(grads)
        outputs = combine(outs, self.rules, executor.denominators)
        combined = combine_gradients(grads, executor.slices, self.program)
        executor.end_step()
        return outputs, combined

    def _hooks(self, optimizer: bool = True) -> dict:
        """What the executor calls back: the stage updates right after the stage's last W, or, with replicas,
        the R action starting the stage's gradient sum and the updates once each sum has landed."""
        update = self.optimizer.stage_done if self.optimizer is not None and optimizer else None
        reduction = self.data_parallel.reduction
        if reduction is None:
            return {"on_stage_done": update}

        def poll(grads):
            for stage in reduction.poll(grads):
                if update is not None:
                    update(stage, grads)

        return {"on_reduce": reduction.launch, "poll": poll}

    def _land_reductions(self, grads: dict) -> None:
        """After the last action: wait for every gradient sum still in flight, then run the updates it held."""
        reduction = self.data_parallel.reduction
        if reduction is None:
            return
        for stage in reduction.poll(grads, block=True):
            if self.optimizer is not None:
                self.optimizer.stage_done(stage, grads)

    def _check_one_batch(self, args: Sequence[Any]) -> None:
        """Every rank of the pipeline must run the same batch: compare the batched arguments' checksums (one small
        all-gather per step), before any piece runs, so a mismatch fails on every rank alike."""
        mine = fingerprint(self.program.inputs, args).view(torch.int64)  # compared bit for bit (NaN equals NaN)
        if mine.numel() == 0:
            return
        everyone = self.comm.all_gather(mine, "comparing the ranks' batches")
        batched = [s.name for s in self.program.inputs if s.batched]
        for rank, theirs in enumerate(everyone):
            differs = [name for name, a, b in zip(batched, everyone[0].tolist(), theirs.tolist()) if a != b]
            if differs:
                error = ZbError(
                    f"pipeline ranks were handed different batches: argument {differs[0]!r} differs between rank 0 "
                    f"and rank {rank}. A zb pipeline runs one batch per step, split into microbatches across its "
                    "stages, so every rank of the pipeline must call the compiled function with the same tensors "
                    "(do not shard the data loader by pipeline rank; every rank reads the same samples)"
                )
                error.agreed = self.comm.spans_job  # every rank saw the same gathered checksums
                raise error

    @property
    def last_rank(self) -> int:
        return self.schedule.placement[self.program.num_stages - 1]

    def _broadcast_outputs(self, outputs: list[Any]) -> list[Any]:
        """Every rank gets the outputs of the rank of the last stage (the others pass buffers of their shape)."""
        result = []
        for j, (spec, rule) in enumerate(zip(self.program.outputs, self.rules)):
            tensor = outputs[j] if outputs[j] is not None else torch.empty(
                combined_shape(spec, rule, self.program.microbatches), dtype=spec.dtype, device=spec.device)
            result.append(self.comm.broadcast(tensor, self.last_rank, f"broadcasting output {j} of the step"))
        return result

    def _sum_shared_gradients(self, grads: list[torch.Tensor | None]) -> None:
        """Inputs whose gradient stages on several ranks produce (tied weights, an input several stages read):
        every such rank gets the summed gradient."""
        for index, ranks in self.program.shared_gradients(self.schedule.placement).items():
            value = grads[index]
            spec = self.program.input_specs[index]
            shape = (spec.shape[0] * self.program.microbatches, *spec.shape[1:]) if self.program.inputs[index].batched \
                else spec.shape
            buffer = value.clone() if value is not None else torch.zeros(shape, dtype=spec.dtype, device=spec.device)
            buffer = self.comm.all_reduce(buffer, f"summing the gradient of {self.program.inputs[index].name}")
            if self.ranks[0] in ranks:
                grads[index] = buffer

    # Re-scheduling ------------------------------------------------------------------------------------------------
    def install(self, schedule: Schedule) -> None:
        """Run `schedule` from the next step on (the same stages and placement, another order)."""
        if tuple(schedule.placement) != tuple(self.schedule.placement):  # what each rank holds follows the placement
            raise ZbError(f"a new schedule must keep the stages' placement {tuple(self.schedule.placement)}; got "
                          f"{tuple(schedule.placement)} (a re-cut builds a new runner instead)")
        self.schedule = schedule
        self.executor.schedule = self._lower(schedule)
        if self.optimizer is not None:
            self.optimizer.set_schedule(schedule)
        self._dump_schedule()

    def _dump_schedule(self) -> None:
        """With ZB_DUMP_DIR, write the schedule this runner runs from the next step on (by the process of rank 0):
        `schedule.txt` (compute actions, one line per rank, parsed back by Schedule.from_text) and
        `schedule_lowered.txt` (with the sends and receives)."""
        directory = os.environ.get("ZB_DUMP_DIR")
        if not directory or 0 not in self.ranks:
            return
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        s = self.schedule
        header = (f"# zb schedule {s.name}: {self.program.num_stages} stages, placement {list(s.placement)}, "
                  f"{s.num_microbatches} microbatches; runs from step {self.steps + 1}\n")
        (path / "schedule.txt").write_text(header + s.text() + "\n")
        (path / "schedule_lowered.txt").write_text(header + self.executor.schedule.text() + "\n")
