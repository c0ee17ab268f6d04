"""What the compiled function runs: one step of the plan's schedule, connected to autograd.

The whole training step (forward and backward of every microbatch, in the schedule's order) runs when the
compiled function is called, because a pipeline interleaves forwards and backwards of different microbatches.
The backward starts from d(loss)/d(loss) = 1; `loss.backward()` then hands out the accumulated gradients scaled
by the gradient that arrives, exact for a scalar loss. Under torch.distributed every rank returns the same
outputs (broadcast from the rank of the last stage) and gets gradients only for the parameters its stages read
(a parameter read on several ranks, like tied embeddings, has its gradient summed across them).
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
from zb.runtime.data_parallel import GradientReduction, LocalReduction, check_same_weights, combine_replicas, owners
from zb.runtime.executor import StepExecutor, combine
from zb.runtime.memory import RankMemory, planned_memory
from zb.runtime.microbatch import fingerprint, split_microbatches
from zb.runtime.optimizer import OptimizerStep, synchronize
from zb.runtime.profile import measured_costs, measured_timeline, modelled_costs
from zb.runtime.released import is_released, release, zb_internal
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
    def __init__(self, program: Program, schedule: Schedule, ranks: Sequence[int], comm, replicas: int = 1,
                 replica_comm=None, replica: int = 0):
        """`replicas` > 1: data parallelism, over `replica_comm` (this rank's replica group; this process is
        replica number `replica`), or, without it, all replicas in this process (runtime/data_parallel.py)."""
        self.program = program
        self.schedule = schedule if program.training else forward_only(schedule)
        self.comm = comm
        self.distributed = comm.distributed
        self.ranks = list(ranks)
        self.replicas, self.replica_comm, self.replica = replicas, replica_comm, replica
        self.executor = StepExecutor(program, self._lower(self.schedule), ranks, comm)
        self.executor.replicas, self.executor.replica = replicas, replica
        self.steps = 0
        # Set by the caller (zb/adapt.py) before a step: the step numbers (counted from 1) whose actions are
        # traced and gathered from every rank, and, per step number, how often each piece runs back to back
        # (the quickest run counts) to measure it.
        self.profile_steps: set[int] = set()
        self.repeat: dict[int, int] = {}
        # What backward hands out for the step just run, until the step's re-cut has read it (zb/adapt.py migrate);
        # then dropped, so that no rank holds a second copy of its gradients between steps.
        self.last_grads: list[torch.Tensor | None] | None = None
        self.trace: list[tuple[int, str, float, float]] = []  # every rank's actions in the last profiled step
        self.costs = None  # costs measured in the last profiled step
        self.quickest: dict = {}  # (stage, kind) -> quickest of repeated runs per action, in a measured step
        self.optimizer = None  # the fused update and its validation, with options["optimizer"]
        # Option grad_scaler of the call being run (set by the backend per call: a pipeline shared between two
        # compiled functions of one model must read the caller's scaler, not the one it was built with).
        self.grad_scaler = program.options.grad_scaler
        owner = None
        if program.training and program.options.shard_optimizer and replica_comm is not None:
            updated = [i for indices in program.updates.values() for i in indices] + list(program.shared_updates)
            owner = owners(program, updated, replicas)
        if program.training and program.options.optimizer is not None:
            self.optimizer = OptimizerStep(program, self.schedule, ranks, comm, replica_comm, owner, replica)
        self.state: dict[int, torch.Tensor] = {}  # input index -> the parameter or buffer of the last call
        self.checked_replicas = False  # the replicas' weights were compared (first step)
        LIVE.add(self)
        self.reduction = None  # sums gradients over the replicas, at the schedule's R actions
        if program.training and replicas > 1:
            self.reduction = (GradientReduction(program, replica_comm, replica, owner) if replica_comm is not None
                              else LocalReduction(program, replicas))
        self._dump_schedule()

    def _lower(self, schedule: Schedule) -> Schedule:
        return lower(schedule, reduce=self.program.training and self.replicas > 1)

    def stage_times(self) -> tuple[float, ...] | None:
        """Measured F+B+W seconds per stage (from the last profiled step), or None: the quickest of each piece
        over the microbatches, what the stage costs undisturbed (the first step's first microbatches are slowed
        by first-touch memory, a peer still compiling, or the machine's other work)."""
        if self.costs is None:
            return None
        if self.quickest:  # a measured step: every piece was run several times
            return tuple(sum(min(times) for (stage, _), times in self.quickest.items() if stage == s)
                         for s in range(self.program.num_stages))
        quickest = measured_costs(self.trace, self.program, statistic=min)
        return tuple(f + b + w for f, b, w in zip(quickest.f, quickest.b, quickest.w))

    def modelled_costs(self) -> Costs:
        """The program's activation memory per stage with unit times: what the simulator needs to predict memory."""
        return modelled_costs(self.program)

    def planned_memory(self) -> dict[int, RankMemory]:
        """Per pipeline rank of this process: the bytes a step holds, item by item and at its peak (activations,
        boundary tensors, gradients and a running piece's working bytes; runtime/memory.py)."""
        return planned_memory(self.program, self.executor.items, self.ranks)

    def measured_timeline(self) -> Timeline:
        """The last profiled step as a Timeline (real start and end of every action on every rank)."""
        if not self.trace:
            raise ZbError("no step was profiled; compile with options={'profile': True}")
        return measured_timeline(self.trace, self.schedule, self.costs)

    def __call__(self, *args: Any) -> Any:
        with zb_internal():  # the other ranks' released parameters pass through as arguments, never read
            self._check_held(args)
            return self._call(args)

    def _state_readers(self) -> list[tuple[Any, set[int]]]:
        """Each parameter and buffer of the plan (its input spec) with the pipeline ranks whose stages read it."""
        readers = self.program.readers(self.schedule.placement)
        return [(s, readers.get(s.index, set())) for s in self.program.inputs if s.kind in ("parameter", "buffer")]

    def _check_held(self, args: Sequence[Any]) -> None:
        """Every parameter and buffer this process's stages read must have its values here."""
        mine = set(self.ranks)
        for spec, ranks in self._state_readers():
            if ranks & mine and is_released(args[spec.index]):
                owner = getattr(args[spec.index], "_zb_owner", "another rank")
                raise ZbError(
                    f"{spec.kind} {spec.name!r} is read by this rank's stages, but its values are not on this "
                    f"process ({owner} holds it). Either a pipeline built for another input shape cut the model "
                    "elsewhere and this rank released it (use options={'release': False}, or fixed "
                    "'split_points'), or a model built on the meta device was not materialised (zb materialises "
                    "the models the compiled function reaches directly: compile the model or a function whose "
                    "arguments, closure or globals hold it)")

    def foreign(self, args: Sequence[Any]) -> dict[int, str]:
        """The parameters and buffers among `args` (the plan's inputs) that only other pipeline ranks' stages read:
        id -> who holds it ("pipeline rank 1 (stage 1)")."""
        mine = set(self.ranks)
        found = {}
        for spec, ranks in self._state_readers():
            if ranks and not ranks & mine:
                stages = [s for s, stage in enumerate(self.program.stages) if spec.index in stage.reads]
                found[id(args[spec.index])] = (f"pipeline rank {min(ranks)} (stage{'s' if len(stages) > 1 else ''} "
                                               f"{', '.join(map(str, stages))})")
        return found

    def release_foreign(self, args: Sequence[Any], foreign: dict[int, str]) -> int:
        """Free the parameters and buffers `foreign` names (`self.foreign(args)`: only other pipeline ranks' stages
        read them; runtime/released.py); returns the bytes freed. Tensors sharing storage with one this process
        reads stay."""
        state = [args[spec.index] for spec, _ in self._state_readers()]
        kept = {t.untyped_storage().data_ptr() for t in state if id(t) not in foreign and not is_released(t)}
        freed = 0
        for tensor in state:
            if id(tensor) not in foreign:
                continue
            if is_released(tensor):  # never materialised here (a meta-built model): say who holds it now
                tensor._zb_owner = foreign[id(tensor)]
            elif tensor.untyped_storage().data_ptr() not in kept:
                freed += release(tensor, foreign[id(tensor)])
        return freed

    def _call(self, args: Sequence[Any]) -> Any:
        self.program.bind(args)  # a plan traced with a symbolic length: this call's shapes and bytes
        if self.optimizer is not None:
            return self._optimizer_step(args)
        if self.program.training:
            self.executor.seed_scale = self._loss_scale()
            return _TrainingStep.apply(self, *args)
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
        return (torch.Tensor._make_subclass(StepLoss, loss), *outputs[1:])

    def run(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        program = self.program
        number = self.steps + 1
        profiled = program.training and (program.options.profile or number in self.profile_steps)
        repeat = self.repeat.get(number, 1) if program.training else 1
        with torch.no_grad():
            if self.distributed:
                self._check_one_batch(args)
            self.state = {s.index: args[s.index] for s in program.inputs if s.kind in ("parameter", "buffer")}
            if self.replica_comm is not None and not self.checked_replicas:
                check_same_weights(self.replica_comm, program, args)
                self.checked_replicas = True
            if repeat > 1 and self.distributed:
                self.comm.barrier("waiting for every rank to finish compiling")  # no peer compiling while timed
            self.executor.timed, self.executor.repeat = profiled, repeat
            if self.replicas > 1 and self.replica_comm is None:
                outputs, combined = self._run_replicas(args)
            else:
                outputs, combined = self._run_replica(args)
            self.executor.repeat = 1
            self.steps = number
            if profiled:
                self._profile()
            self.last_grads = combined
        return outputs, combined

    def _run_replica(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        """This process's part of the step: its ranks' actions on its batch (its replica's, with replicas)."""
        program, executor = self.program, self.executor
        totals = executor.prepare(args)
        counts = None
        if self.replica_comm is not None:
            counts = self._exchange_counts(args, totals)
            executor.totals = torch.tensor([sum(c[k] for c in counts) for k in range(len(counts[0]))],
                                           dtype=torch.float64) if totals is not None else None
        outs, grads = executor.run(None, **self._hooks())
        self._land_reductions(grads)
        outputs, combined = combine(outs, grads, executor.slices, program, executor.denominators)
        executor.end_step()
        if self.distributed:
            outputs = self._broadcast_outputs(outputs)
            self._sum_shared_gradients(combined)
        if self.reduction is not None:
            self.reduction.reduce_shared(combined)
        if self.replica_comm is not None:
            outputs = self._replica_outputs(outputs, counts)
        return outputs, combined

    def _run_replicas(self, args: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        """Data parallelism in one process: the batch split into `replicas` parts, each run in turn as its own
        replica; the last one completes the gradient sums (and runs the updates)."""
        program, executor = self.program, self.executor
        prepared, local = [], []  # each replica's microbatches and loss denominators, and their totals
        for part in split_microbatches(program.inputs, args, self.replicas):
            local.append(executor.prepare(part))
            prepared.append((executor.inputs, executor.denominators))
        totals = torch.stack(local).sum(0) if local[0] is not None else None
        per_replica, slices = [], {}
        for r, (inputs, denominators) in enumerate(prepared):
            executor.inputs, executor.denominators = inputs, denominators
            executor.totals, executor.replica = totals, r
            if self.reduction is not None:
                self.reduction.begin(r)
            last = r == self.replicas - 1
            outs, grads = executor.run(None, **(self._hooks() if last else self._hooks(optimizer=False)))
            if last:
                self._land_reductions(grads)
            outputs, combined = combine(outs, grads, executor.slices, program, executor.denominators)
            executor.end_step()
            if self.reduction is not None:
                self.reduction.reduce_shared(combined)
            per_replica.append(outputs)
            for i, spec in enumerate(program.inputs):
                if spec.batched and combined[i] is not None:
                    slices.setdefault(i, []).append(combined[i])
        for i, values in slices.items():
            combined[i] = torch.cat(values)
        counts = [t.tolist() for t in local] if totals is not None else None
        return combine_replicas(per_replica, self._rules(), self._loss_mode(), counts), combined

    def _hooks(self, optimizer: bool = True) -> dict:
        """What the executor calls back: the stage updates right after the stage's last W, or, with replicas,
        the R action starting the stage's gradient sum and the updates once each sum has landed."""
        update = self.optimizer.stage_done if self.optimizer is not None and optimizer else None
        if self.reduction is None:
            return {"on_stage_done": update}

        def poll(grads):
            for stage in self.reduction.poll(grads):
                if update is not None:
                    update(stage, grads)

        return {"on_reduce": self.reduction.launch, "poll": poll}

    def _land_reductions(self, grads: dict) -> None:
        """After the last action: wait for every gradient sum still in flight, then run the updates it held."""
        if self.reduction is None:
            return
        for stage in self.reduction.poll(grads, block=True):
            if self.optimizer is not None:
                self.optimizer.stage_done(stage, grads)

    def _rules(self) -> list[Any]:
        loss = self.program.loss
        if loss is not None:
            return list(loss.outputs)
        return ["mean" if spec is not None and not spec.shape else ("concat", 0) for spec in self.program.outputs]

    def _loss_mode(self) -> str:
        return self.program.loss.mode if self.program.loss is not None else "mean"

    def _exchange_counts(self, args: Sequence[Any], totals: torch.Tensor | None) -> list[list[float]]:
        """Every replica's batch size and loss denominators (one small all-gather per step): the loss is
        normalised by the global batch, which needs replicas of one batch size."""
        sizes = {args[s.index].shape[0] for s in self.program.inputs if s.batched}
        mine = torch.tensor([float(max(sizes, default=0)), *(totals.tolist() if totals is not None else [])],
                            dtype=torch.float64)
        everyone = [t.tolist() for t in self.replica_comm.all_gather(mine, "comparing the replicas' batches")]
        if len({row[0] for row in everyone}) > 1:
            raise ZbError(
                f"data-parallel replicas were handed batches of different sizes "
                f"({', '.join(f'replica {r}: {int(row[0])}' for r, row in enumerate(everyone))}); every replica's "
                "batch must have the same size, so that the step equals eager on their concatenation (drop the "
                "last incomplete batch, e.g. DataLoader(..., drop_last=True))"
            )
        return [row[1:] for row in everyone]

    def _replica_outputs(self, outputs: list[Any], counts: list[list[float]] | None) -> list[Any]:
        """The loss and every scalar output over all replicas (one all-gather); other outputs stay this
        replica's (they describe its own samples)."""
        scalars = [j for j, o in enumerate(outputs) if isinstance(o, torch.Tensor) and o.dim() == 0]
        if not scalars:
            return outputs
        mine = torch.stack([outputs[j].detach().double().cpu() for j in scalars])
        everyone = self.replica_comm.all_gather(mine, "combining the replicas' losses")
        rules = self._rules()
        per_replica = [[values[k].to(outputs[j].dtype).to(outputs[j].device) for k, j in enumerate(scalars)]
                       for values in everyone]
        merged = combine_replicas(per_replica, [rules[j] for j in scalars], self._loss_mode(), counts)
        result = list(outputs)
        for k, j in enumerate(scalars):
            result[j] = merged[k]
        return result

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

    def _profile(self) -> None:
        trace, quickest = self.executor.trace, self.executor.quickest
        if self.distributed:
            everyone = self.comm.all_gather_object((trace, quickest), "gathering every rank's step timings")
            trace = [record for records, _ in everyone for record in records]
            quickest = {key: times for _, theirs in everyone for key, times in theirs.items()}
        self.trace, self.quickest = trace, quickest
        self.costs = measured_costs(trace, self.program)

    def install(self, schedule: Schedule) -> None:
        """Run `schedule` from the next step on (the same stages and placement, another order)."""
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

    def owned(self) -> tuple[set[int], set[int]]:
        """(ids of the parameters and buffers this process's stages read, ids of those no stage reads): what a
        checkpoint of this process holds, and what every process may write (never changed by a step)."""
        mine, nobody = set(), set()
        for spec, ranks in self._state_readers():
            tensor = self.state.get(spec.index)
            if tensor is None:
                continue
            if not ranks:
                nobody.add(id(tensor))
            elif ranks & set(self.ranks):
                mine.add(id(tensor))
        return mine, nobody

    @property
    def last_rank(self) -> int:
        return self.schedule.placement[self.program.num_stages - 1]

    def _broadcast_outputs(self, outputs: list[Any]) -> list[Any]:
        m = self.program.microbatches
        result = []
        rules = self.program.loss.outputs if self.program.loss is not None else None
        for j, spec in enumerate(self.program.outputs):
            rule = rules[j] if rules is not None else (("concat", 0) if spec.shape else "mean")
            shape = list(spec.shape)
            if isinstance(rule, tuple) and rule[0] == "concat":
                shape[rule[1]] *= m
            tensor = outputs[j] if outputs[j] is not None else torch.empty(tuple(shape), dtype=spec.dtype,
                                                                           device=spec.device)
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
        ctx.grads, ctx.program, ctx.scale = grads, runner.program, runner.executor.seed_scale
        # An extra output that depends on parameters requires grad, as in eager, so that differentiating it is
        # an error in backward below rather than a gradient silently missing.
        loss = runner.program.loss
        learned = loss.learned if loss is not None else [False] * len(outputs)
        ctx.mark_non_differentiable(*(o for j, o in enumerate(outputs) if j > 0 and isinstance(o, torch.Tensor)
                                      and not (learned[j] and o.is_floating_point())))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *extra: Any):
        with zb_internal():
            return _TrainingStep._backward(ctx, grad_loss, *extra)

    @staticmethod
    def _backward(ctx, grad_loss: torch.Tensor, *extra: Any):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise ZbError(
                "backward through a zb training step ran twice; each call of the compiled function computes "
                "gradients for one backward"
            )
        for j, grad in enumerate(extra, start=1):
            if grad is not None and bool((grad != 0).any()):
                raise ZbError(
                    f"output {j} of the compiled function was differentiated, but zb runs the backward of the loss "
                    "(output 0) only, inside the step; add the term into the loss inside the compiled function, "
                    f"for example `return loss + 0.01 * aux, aux.detach()`"
                )
        # The step's backward started from d(loss) = ctx.scale (option grad_scaler's scale, else 1): the gradients
        # are ctx.scale times the loss's; what arrives here asks for grad_loss times them.
        # Compared in float64: a float16 loss scaled past 65504 arrives as inf (eager's gradients are then all inf
        # and its scaler skips the step), which must not pass for the finite scale the step started from.
        exact_one = bool((grad_loss.double() == ctx.scale).all())
        program = ctx.program
        finite = bool(torch.isfinite(grad_loss).all())  # inf: the scaled loss overflowed, every gradient is non-finite
        if not exact_one and finite and torch.float16 in program.compute_dtypes and ctx.scale != 1.0:
            raise ZbUnsupportedError(
                f"with option 'grad_scaler' the step's backward started from the scaler's scale {ctx.scale:g}, so "
                "loss.backward() must be called on exactly scaler.scale(loss) (float16 compute: a backward from "
                f"another value, here {float(grad_loss):g}, would flush other gradients to zero than eager's)")
        if not exact_one and finite and torch.float16 in program.compute_dtypes:
            raise ZbUnsupportedError(
                "loss scaling (torch.amp.GradScaler, or loss.backward(gradient) other than 1) with float16 compute "
                "needs option 'grad_scaler' (your scaler): eager runs the float16 backward from the scaled loss, so "
                "small gradients survive there that zb's backward, run inside the step, would flush to zero unless it "
                "starts from the same scale. Pass options={'grad_scaler': scaler} and call "
                "scaler.scale(loss).backward()")
        if program.compute_dtypes and any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
            raise ZbUnsupportedError(
                "loss.backward() was called inside a torch.autocast region: eager would run the backward's float32 "
                "operations under autocast too, while zb ran the step's backward as it runs after the region. Call "
                "loss.backward() after the `with torch.autocast(...)` block, as PyTorch's mixed-precision examples do")
        factor = grad_loss if ctx.scale == 1.0 else grad_loss.double() / ctx.scale
        return (None, *[g if g is None or exact_one else g * factor for g in grads])

