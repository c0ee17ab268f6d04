"""Execute one step of a program: every local rank's lowered action list (F, B, W, BW, sends and receives).

Per (stage, microbatch) the executor keeps the values its pieces read and write (see passes/plan.py for the
keys) and frees each as soon as no later piece of that stage reads it (the program's `drops`). Boundary tensors
go into mailboxes: `forward[(stage, mb)]` holds the act:<name> outputs of a stage's F, `backward[(stage, mb)]`
the grad:act:<name> outputs of its B; the next stage reads them directly when it lives on the same rank, else
they travel through the communication module (SEND_*/RECV_*). In one process every rank's list runs here, a
rank yielding at a receive whose message is not there yet; under torch.distributed each process runs its own
rank's list. Sends and receives run as the schedule's communication program (schedules/p2p.py): batches posted
just in time, in an order proven to run under NCCL's rules, each value waited for right before its reader.
The executor reads only the program (codegen/program.py) and the schedule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from zb.codegen.program import (
    ACT, DISCARD, ENV, GRAD_ACT, GRAD_SLICE, GRAD_SUM, LOSS_TANGENT, OUT, Key, Kind, PieceName, Program,
    TensorSpec, nbytes,
)
from zb.core.errors import ZbError
from zb.runtime.microbatch import split_microbatches
from zb.runtime.profile import ActionClock, timed_runs
from zb.schedules import BW, REDUCE, SEND_F, Action, B, F, Schedule, W
from zb.schedules.p2p import SEND, Batch, Wait, communication


class StepExecutor:
    """Runs one step's actions for this process's ranks: the pieces, the boundary mailboxes and the sends and
    receives, keeping each microbatch's values only as long as a later piece reads them."""

    def __init__(self, program: Program, schedule: Schedule, ranks: Sequence[int], comm):
        self.program, self.ranks, self.comm = program, list(ranks), comm
        self.schedule = schedule  # lowered; sets the communication program too
        self.placement = schedule.placement
        stages = program.stages
        self.forward_spec = {s: stages[s].receives_forward for s in range(1, program.num_stages)}
        self.backward_spec = {s: stages[s].receives_backward for s in range(program.num_stages - 1)}
        local = [s.index for s in stages if self.placement[s.index] in self.ranks]
        self.clock = ActionClock(stages[local[0]].device if local else torch.device("cpu"))
        self.timed = False  # set by the runner for a step whose actions are traced
        self.trace: list[tuple[int, str, float, float]] = []  # (rank, action, start, end) of the last timed step
        # With repeat > 1 every piece runs that many times back to back (the same inputs, the random state
        # replayed; only the first run's results are kept) and `quickest[(stage, kind)]` collects, per action,
        # the quickest run: a timing that one disturbed run cannot spoil. Used to measure the first step.
        self.repeat = 1
        self.quickest: dict[tuple[int, str], list[float]] = {}
        self.peak_memory: dict[int, int] = {}  # activation bytes each local rank held at most in the last step
        # Data parallelism: how many replicas run this program and which one this is (seeds differ per replica;
        # the loss weights and seed divide by the replicas' total), and the loss denominators summed over all
        # replicas' batches (`totals`, set between prepare and run; None: this batch's own).
        self.replicas, self.replica = 1, 0
        self.seed_scale = 1.0  # the backward starts from this times d(loss) (option grad_scaler's scale)
        self.totals: torch.Tensor | None = None
        self.on_reduce = None

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, lowered: Schedule) -> None:
        """Run `lowered` from the next step on, as its communication program (schedules/p2p.py: sends and receives
        batched just in time, in an order verified to run under NCCL's rules)."""
        self._schedule = lowered
        self.items = communication(lowered)

    # One step ---------------------------------------------------------------------------------------------
    def prepare(self, args: Sequence[Any]) -> torch.Tensor | None:
        """Split this step's batch into microbatches and count each microbatch's loss denominators; returns their
        totals over the batch (float64, one per denominator) or None. Data-parallel replicas sum these totals
        (runtime/replicas.py) and hand the sum back as `totals` before `run`."""
        self.inputs = split_microbatches(self.program.inputs, args, self.program.microbatches)
        self.denominators = self._denominators()
        self.totals = None
        if not self.denominators or not self.denominators[0]:
            return None
        return torch.stack([torch.stack([d[k] for d in self.denominators]).sum().double().cpu()
                            for k in range(len(self.denominators[0]))])

    def run(self, args: Sequence[Any] | None, on_stage_done=None, on_reduce=None,
            poll=None) -> tuple[list[list[Any]], dict[int, list[torch.Tensor]]]:
        """Runs every action of the local ranks; returns (per-output lists over microbatches, grads by input).

        `args` is the step's batch (None: already given to `prepare`). The gradients map an input's index to one
        slice per microbatch for a batched input, and to [the sum over microbatches] for any other (parameters,
        buffers). `on_stage_done(stage, grads)` is called right after a stage's last compute action (its last W),
        with the gradients produced so far; `on_reduce(stage, grads)` at the stage's R action (data parallelism);
        `poll(grads)` after every action."""
        program = self.program
        last = {}
        for r in self.ranks:
            for a in self.schedule.actions[r]:
                if a.kind in (F, B, W, BW):
                    last[a.stage] = a
        if args is not None:
            self.prepare(args)
        # Random ops (dropout): one seed per step from the user's generator (so every rank, seeded alike, draws
        # the same), and from it one per (replica, stage, microbatch), so no two microbatches, stages or
        # replicas share a mask.
        self.seed = int(torch.randint(0, 2**62, (1,))) if any(s.random for s in program.stages) else None
        if self.seed is not None:
            self.seed += 1_000_000_007 * self.replica
        if program.loss is not None and program.loss.mode == "weighted":
            self._add_loss_weights()
        self.on_reduce = on_reduce
        self._step_values(program.num_outputs)
        self.quickest = {}
        self._make_copies()
        self.clock.begin(self.timed)
        self.held = {r: 0 for r in self.ranks}
        self.peak_memory = {r: 0 for r in self.ranks}
        position = {r: 0 for r in self.ranks}
        while any(position[r] < len(self.items[r]) for r in self.ranks):
            progressed = False
            for rank in self.ranks:
                items = self.items[rank]
                while position[rank] < len(items):
                    item = items[position[rank]]
                    if isinstance(item, Batch):
                        self._post(rank, item)
                    elif isinstance(item, Wait):
                        if not self._arrived(item.message):
                            break  # in one process: another rank runs first
                    else:
                        mark = self.clock.start()
                        self._do(rank, item)
                        self.clock.stop(mark, rank, item)
                        if self.repeat > 1 and item.kind in (F, B, W, BW):
                            self.quickest.setdefault((item.stage, item.kind), []).append(self._seconds)
                        if last.get(item.stage) == item:
                            self._drop_copies(item.stage)
                            if on_stage_done is not None and program.training:
                                on_stage_done(item.stage, self.grads)
                        if poll is not None:
                            poll(self.grads)
                        self.comm.release_sent()
                    position[rank] += 1
                    progressed = True
            if not progressed:
                stuck = [str(self.items[r][position[r]]) for r in self.ranks if position[r] < len(self.items[r])]
                raise ZbError(f"the pipeline step deadlocked at {', '.join(stuck)}")
        self.comm.finish()
        self.trace = self.clock.records()
        return self.outs, self.grads

    def end_step(self) -> None:
        """Forget the step's values once the runner has combined them: between steps the executor holds no
        gradient, activation or batch slice (the gradients live on in what the step returned, until backward)."""
        self._step_values(0)
        self.inputs = []

    def _step_values(self, outputs: int) -> None:
        """Empty holders for one step's values (`outputs`: how many model outputs it collects)."""
        self.env: dict[tuple[int, int], dict[Key, Any]] = defaultdict(dict)
        self.forward_box: dict[tuple[int, int], dict[Key, torch.Tensor]] = {}
        self.backward_box: dict[tuple[int, int], dict[Key, torch.Tensor]] = {}
        self.outs: list[list[Any]] = [[] for _ in range(outputs)]
        self.grads: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.owned: set[int] = set()  # unbatched inputs whose gradient sum this step allocated
        # Batched inputs: the gradient of each microbatch's slice, summed over the stages that read the input.
        self.slices: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        self.receiving: dict[Action, Any] = {}  # message -> the handle of the receive posted for it

    def _make_copies(self) -> None:
        """Mixed precision (option param_dtype): each parameter a stage of this process reads, copied once for the
        step in the policy's dtype; every microbatch's pieces read the copy (passes/precision_policy.py)."""
        self.copy_readers: dict[int, set[int]] = {}
        copies = self.program.copies
        if not copies:
            return
        local = [s.index for s in self.program.stages if self.placement[s.index] in self.ranks]
        for index, dtype in copies.items():
            readers = {s for s in local if index in self.program.stages[s].reads}
            if readers:
                self.copy_readers[index] = readers
                copy = self.inputs[0][index].detach().to(dtype)
                for inputs in self.inputs:
                    inputs[index] = copy

    def _drop_copies(self, stage: int) -> None:
        """After a stage's last action: free the copies no other stage of this process still reads."""
        for index, readers in list(self.copy_readers.items()):
            readers.discard(stage)
            if not readers:
                del self.copy_readers[index]
                for inputs in self.inputs:
                    inputs[index] = None

    def _denominators(self) -> list[list[torch.Tensor]] | None:
        """Each microbatch's loss denominators (token counts and the like), computed from its inputs before the
        step's first action."""
        loss = self.program.loss
        if loss is None or loss.denominator is None:
            return None
        piece = loss.denominator
        return [list(piece([inputs[k.index] for k in piece.inputs])) for inputs in self.inputs]

    def _add_loss_weights(self) -> None:
        """The inputs normalize_loss added: per microbatch, the weight of each class of loss terms."""
        program = self.program
        m = program.microbatches
        spec = program.outputs[0]
        for index, kind, denominator in program.loss.weights:
            if kind == "ratio":
                total = self.totals[denominator] if self.totals is not None else \
                    torch.stack([d[denominator] for d in self.denominators]).sum()
                weight = (1.0 / total.to(spec.device, torch.float64)).to(spec.dtype)
            else:
                weight = torch.tensor(1.0 / (m * self.replicas) if kind == "mean" else 1.0, dtype=spec.dtype,
                                      device=spec.device)
            for inputs in self.inputs:
                assert len(inputs) == index, (len(inputs), index)
                inputs.append(weight)

    def _post(self, rank: int, batch: Batch) -> None:
        """Issue one batch of sends and receives: a send hands over (and forgets) the values its message carries."""
        payloads, specs = [], []
        for op in batch.ops:
            s, kind, mb = op.message
            if op.kind != SEND:
                payloads.append(None)
                specs.append(self._carried(op.message))
            elif kind == SEND_F:
                box = self.forward_box.pop((s, mb))
                payloads.append([box[spec.key] for spec in self.forward_spec[s + 1]])
                specs.append(None)
            else:  # no gradient flowed back (a frozen part): zeros are sent
                box = self.backward_box.pop((s, mb), {})
                payloads.append([_grad_or_zeros(box, spec) for spec in self.backward_spec[s - 1]])
                specs.append(None)
        for op, handle in zip(batch.ops, self.comm.post(rank, batch.ops, payloads, specs)):
            if op.kind != SEND:
                self.receiving[op.message] = (op, handle)

    def _carried(self, message: Action) -> list[TensorSpec]:
        """The tensors a message carries: the receiving stage's boundary specs."""
        s = message.stage
        return self.forward_spec[s + 1] if message.kind == SEND_F else self.backward_spec[s - 1]

    def _arrived(self, message: Action) -> bool:
        """Whether `message` is here (under torch.distributed: waits for it); if so, puts it in its mailbox."""
        op, handle = self.receiving[message]
        if not self.comm.arrived(handle):
            return False
        del self.receiving[message]
        tensors = self.comm.take(handle, op)
        s, kind, mb = message
        spec = self._carried(message)
        if kind == SEND_F:
            self.forward_box[(s, mb)] = _checked(dict(zip((x.key for x in spec), tensors)), spec, s, s + 1)
        else:
            self.backward_box[(s, mb)] = {x.key.grad(): t for x, t in zip(spec, tensors)}
        return True

    def _do(self, rank: int, action: Action) -> None:
        s, kind, mb = action
        self._seconds = 0.0  # the quickest run of each piece this action runs, summed
        if kind == F:
            self._forward(s, mb)
        elif kind == B:
            self._backward_input(s, mb)
        elif kind == W:
            self._run(s, mb, PieceName.BACKWARD_WEIGHT)
        elif kind == BW:
            self._backward_input(s, mb)
            self._run(s, mb, PieceName.BACKWARD_WEIGHT)
        elif kind == REDUCE:
            if self.on_reduce is not None:
                self.on_reduce(s, self.grads)

    def _call(self, piece, args: list, written: Sequence[int] = ()) -> tuple:
        if self.repeat <= 1:
            return piece(args)
        results, seconds = timed_runs(piece, args, self.repeat, self.clock, written)
        self._seconds += seconds
        return results

    def _forward(self, s: int, mb: int) -> None:
        env = self.env[(s, mb)]
        incoming = self.forward_box.pop((s - 1, mb), {}) if s > 0 else {}
        for key in self.program.stages[s].pieces[PieceName.FORWARD].inputs:
            if key.is_(Kind.IN):
                env[key] = self.inputs[mb][key.index]
            else:
                env[key] = incoming[key]
        if self.seed is None or not self.program.stages[s].random:
            self._run(s, mb, PieceName.FORWARD)
        else:
            device = self.program.stages[s].device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed((self.seed + 1_000_003 * s + 7_919 * mb) % 2**63)
                self._run(s, mb, PieceName.FORWARD)
        if self.program.training and s == self.program.num_stages - 1:
            # The step's loss is the mean of the microbatches' losses (each seeded with 1/m), or their sum when
            # they are weighted or meant to be added (seed 1): passes/normalize_loss.py.
            loss = self.program.loss
            m = self.program.microbatches * self.replicas
            # The loss scale first, in the loss's dtype, then the mean's 1/m: eager's scaler.scale(loss) of a
            # float16 loss overflows to inf at a scale of 65536 (and the step is skipped), so must this seed.
            seed = torch.full_like(self.outs[0][-1], self.seed_scale)
            env[LOSS_TANGENT] = seed / m if loss is None or loss.mode == "mean" else seed

    def _backward_input(self, s: int, mb: int) -> None:
        env = self.env[(s, mb)]
        if s < self.program.num_stages - 1:
            box = self.backward_box.pop((s + 1, mb), {})
            for spec in self.backward_spec[s]:
                env[spec.key.tangent()] = _grad_or_zeros(box, spec)
        self._run(s, mb, PieceName.BACKWARD_INPUT)

    def _run(self, s: int, mb: int, name: PieceName) -> None:
        piece = self.program.stages[s].pieces.get(name)
        if piece is None:  # e.g. the first stage's B when its inputs need no gradient: W does everything
            return
        if piece.run is None:
            raise ZbError(f"stage {s} {name} was not compiled in this process (rank {self.placement[s]})")
        env = self.env[(s, mb)]
        rank = self.placement[s]
        # (a plan input no earlier piece of the microbatch read: a size a symbolic B or W takes, passes/split_backward)
        sums = {spec.key: self._sum(spec) for spec in piece.sums}  # added into in place (codegen/accumulate.py)
        results = self._call(piece.run, [sums[k] if k in sums else env[k] if k in env or not k.is_(Kind.IN)
                                         else self.inputs[mb][k.index] for k in piece.inputs],
                             [i for i, k in enumerate(piece.inputs) if k in sums])
        summed = []  # (input index, gradient) of unbatched inputs (parameters): summed over microbatches here
        held = 0
        for route, value in zip(piece.routes, results):
            if route.counted:
                held += nbytes(value)
            kind = route.kind
            if kind == ENV:
                env[route.key] = value
            elif kind == OUT:
                self.outs[route.index].append(value)
            elif kind == ACT:
                self.forward_box.setdefault((s, mb), {})[route.key] = value
            elif kind == GRAD_ACT:
                self.backward_box.setdefault((s, mb), {})[route.key] = value
            elif kind == GRAD_SLICE:
                slices = self.slices[route.index]
                slices[mb] = value if mb not in slices else slices[mb] + value
            elif kind == GRAD_SUM:
                summed.append((route.index, value))
            else:
                assert kind == DISCARD, kind
        if summed:
            self._accumulate(summed)
        for key, counted in piece.drops:
            value = env.pop(key, None)
            if counted and value is not None:
                held -= nbytes(value)
        self.held[rank] += held
        # Sampled between actions, as the schedule simulator accounts memory.
        self.peak_memory[rank] = max(self.peak_memory[rank], self.held[rank])
        if not env:
            self.env.pop((s, mb), None)

    def _sum(self, spec: TensorSpec) -> torch.Tensor:
        """The step's gradient sum of input `spec.key.index` that a piece adds into: zeros at its first use."""
        index = spec.key.index
        if index not in self.grads:
            self.grads[index] = [spec.zeros()]
        elif index not in self.owned:  # a gradient another piece returned, kept as it is: it may alias a value
            self.grads[index] = [spec.zeros().add_(self.grads[index][0])]  # and have other strides than the sum's
        self.owned.add(index)
        return self.grads[index][0]

    def _accumulate(self, grads: list[tuple[int, torch.Tensor]]) -> None:
        """Add one piece's parameter gradients to the step's sums (`grads[index]` = [sum]) as they come: no
        microbatch's gradients wait until the end of the step. A piece's first output is kept as it is (it may
        alias another value); the first addition makes a sum of the step's own, later ones add in place."""
        start, more = [], []
        want = self.program.reduce_dtype  # mixed precision: summed in this dtype (float32), whatever W made
        for i, g in grads:
            if i not in self.grads:
                if want is not None and g.dtype != want:
                    g = g.to(want)  # a sum of the step's own from the start
                    self.owned.add(i)
                self.grads[i] = [g]
            else:
                (more if i in self.owned else start).append((i, g))
        if start:
            totals = torch._foreach_add([self.grads[i][0] for i, _ in start], [g for _, g in start])
            for (i, _), total in zip(start, totals):
                self.grads[i] = [total]
                self.owned.add(i)
        if more:
            torch._foreach_add_([self.grads[i][0] for i, _ in more], [g for _, g in more])


def _grad_or_zeros(box: dict, spec: TensorSpec) -> torch.Tensor:
    value = box.get(spec.key.grad())
    return value if value is not None else spec.zeros()


def _checked(values: dict, specs: Sequence[TensorSpec], src: int, dst: int) -> dict:
    for spec in specs:
        got = values[spec.key]
        if tuple(got.shape) != spec.shape or got.dtype != spec.dtype:
            raise ZbError(f"stage {src} sent {spec.key} as {got.dtype}{list(got.shape)} but stage {dst} expects "
                          f"{spec.dtype}{list(spec.shape)}: the stages were compiled for different inputs")
    return values


def combine_gradients(grads: dict[int, list[torch.Tensor]], slices: dict[int, dict[int, torch.Tensor]],
                      program: Program) -> list[torch.Tensor | None]:
    """One gradient per input from a step's per-microbatch results: a parameter's summed over microbatches as the
    pieces ran, a batched input's slices put back in microbatch order (the outputs: runtime/combine.py)."""
    microbatches = program.microbatches
    combined: list[torch.Tensor | None] = [None] * len(program.inputs)
    for index, values in grads.items():
        (combined[index],) = values
        spec = program.input_specs[index]
        if index in program.copies and spec is not None and combined[index].dtype != spec.dtype:
            combined[index] = combined[index].to(spec.dtype)  # summed in a reduce_dtype other than the parameter's
    for index, by_microbatch in slices.items():
        if len(by_microbatch) != microbatches:
            raise ZbError(f"input {program.inputs[index].name!r} got gradients for {len(by_microbatch)} of "
                          f"{microbatches} microbatches; the schedule ran a backward twice or not at all")
        combined[index] = torch.cat([by_microbatch[mb] for mb in range(microbatches)])
    return combined
