"""The optimizer step inside the pipeline: fused per-stage updates, and post-validation.

With options["optimizer"], a call of the compiled model is a whole training step. Each stage's parameters are
updated by one fused kernel (ops/optimizer.py, chosen by the assign_updates pass; runtime/fused_update.py runs,
backs up and restores it) as soon as the stage has run its last W. What an update must know first is global: the
gradient norm over every rank (for `max_grad_norm`) and whether any gradient is NaN/Inf (then the step is skipped,
as a loss-scaled loop skips it).

A rank's *contribution* is (sum of squared gradient norms, any non-finite) over the parameters it updates (a
parameter updated on several ranks, a tied weight, counts on the lowest of them).

Synchronous (post_validation=False): after the rank's last W the contributions are summed over all ranks (an
all-reduce: every rank waits for the slowest), then each rank updates, clipped or skipped as the sum says.

Post-validation (the default; the paper's "bypassing optimizer synchronisation"): the partial sum travels from
the last rank to rank 0, the order in which zero-bubble schedules finish; each rank adds its own contribution,
passes it on and updates at once, unless what it already knows says the step will be clipped (the partial norm
is over the limit) or skipped (a non-finite gradient); then it holds its update back. Rank 0 ends with the
global values: it validates its own update at once and sends them to every other rank, which validates before
its first forward of the next step (or when `zb.synchronize(optimizer)` or `optimizer.state_dict()` asks).
Validating a step that had to be skipped restores the backup taken before the update (parameters and optimizer
state, bit for bit); one that had to be clipped is restored and redone with the clipped gradients; a held-back
update runs clipped, or not at all.

Loss scaling (option grad_scaler, float16): the step's backward starts from the scaler's scale S, so every
gradient is S times the loss's. Contributions are counted unscaled (squares times 1/S^2) and each update multiplies
its gradients by 1/S (times the clip coefficient), as `scaler.unscale_(optimizer)` before clipping does; a
non-finite gradient skips the step. Once a step's verdict is known on a process, its scaler is updated as
`scaler.update()` would (backoff after a skipped step, growth after `growth_interval` clean ones): every process
reaches the same verdict, so every process's scaler follows the same trajectory, and the next step's backward
starts from the new scale (a step begins by validating the previous one).

Data parallelism: every replica updates with the same summed gradients, so each pipeline reaches the same
verdict on its own. With `shard_optimizer` a replica updates only the parameters it owns (`owner`), so its
contribution counts only those and is summed over the replica group before it joins the pipeline's sum; once a
step is validated each owner broadcasts the parameters it updated, and the other replicas wait for them before
their next step (or `zb.synchronize`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from zb.codegen.program import Program
from zb.core.errors import ZbError
from zb.runtime.fused_update import FusedUpdater, Update, updated_scale
from zb.schedules import COMPUTE, Schedule

PARTIAL, FULL = 0, 1  # control messages: the partial sum going down the ranks, the global one coming back


@dataclass
class StepRecord:
    """What happened to one step, once validated (runner.optimizer.history)."""

    step: int
    grad_norm: float
    clipped: bool
    skipped: bool
    rolled_back: int = 0  # updates this process applied early and had to restore


@dataclass
class _Pending:
    """A step's updates still waiting for its verdict, and how the global values reach them."""

    step: int
    updates: list[Update] = field(default_factory=list)
    work: object = None  # the receive of the global values (other ranks than 0, across processes)
    buffer: torch.Tensor | None = None
    total: tuple[float, bool] | None = None


class OptimizerStep:
    """Runs the optimizer step of a pipeline's training steps on this process: counts each rank's gradient norm,
    passes the sums between ranks, and updates (early, held back, restored or redone) as the verdict requires."""

    def __init__(self, program: Program, schedule: Schedule, ranks: Sequence[int], comm, replica_comm=None,
                 owner: dict[int, int] | None = None, replica: int = 0):
        options = program.options
        self.replica_comm, self.owner, self.replica = replica_comm, owner, replica
        self.broadcasts: list = []  # owners' parameter broadcasts in flight (shard_optimizer)
        self.program = program
        self.optimizer = options.optimizer
        self.updater = FusedUpdater(self.optimizer, options.max_grad_norm)
        self.group_of = self.updater.group_of
        self.post_validation = options.post_validation
        self.ranks = list(ranks)
        self.comm = comm
        self.distributed = comm.distributed
        self.set_schedule(schedule)
        self.steps = 0
        self.pending: list[_Pending] = []
        self.history = history(self.optimizer)  # shared by every plan driving this optimizer
        self.params: list = []
        self.contribution: dict[int, list[float]] = {}
        self.updates: dict[int, list[Update]] = {}
        self.sends: list = []
        self.scaler = None  # option grad_scaler of the running call (torch.amp.GradScaler), set by begin
        self.unscale = 1.0  # 1 / the running step's loss scale
        _register(self)

    def set_schedule(self, schedule: Schedule) -> None:
        self.num_ranks = schedule.num_ranks
        self.placement = schedule.placement
        # The stage each rank finishes with: its update waits for the partial sum (the others update early).
        self.finishing = {r: next(a.stage for a in reversed(schedule.actions[r]) if a.kind in COMPUTE)
                          for r in range(self.num_ranks) if any(a.kind in COMPUTE for a in schedule.actions[r])}
        # A tied weight: counted in the norm on the lowest rank holding it; updated by every rank holding it
        # (each process has its own copy), once in one process.
        holders = {i: self.program.producer_ranks(i, self.placement) for i in self.program.shared_updates}
        self.counted_shared = {i: r[0] for i, r in holders.items()}
        first_local = {i: min((h for h in hs if h in self.ranks), default=None) for i, hs in holders.items()}
        self.shared_on = {r: [i for i, h in first_local.items() if h == r] for r in self.ranks}

    # One step ---------------------------------------------------------------------------------------------
    def begin(self, args: Sequence, scaler=None) -> float:
        """Before the step's first action: earlier steps validated (also those of another plan of the same model,
        e.g. before a re-partition, and with them the loss scale updated), this step's parameters looked up.
        Returns the loss scale the step's backward starts from (1 without an enabled `scaler`)."""
        synchronize(self.optimizer)
        self.params = list(args)
        self.wait_broadcasts()
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if self.steps == 0:
            self._check_same_scalers()
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        self.unscale = 1.0 / scale
        if self.steps == 0:
            missing = [self.program.inputs[i].name for i in self._all_updated() if self.params[i] not in self.group_of]
            if missing and len(missing) == len(self._all_updated()):
                raise ZbError("options['optimizer'] holds none of the model's trainable parameters; build it "
                              "from model.parameters()")
        self.contribution = {r: [0.0, 0.0] for r in self.ranks}
        self.updates = {r: [] for r in self.ranks}
        return scale

    def _check_same_scalers(self) -> None:
        """Every process unscales with its own scaler's scale, which only the loss's rank seeds the backward with,
        and replicas sum gradients seeded by their own: the scalers of the pipeline's ranks and of the replicas
        must start alike (they then move alike, on the same verdicts). Asked on every rank, with a scaler or
        not (a rank without one sends None), at each plan's first step."""
        mine = self.scaler.state_dict() if self.scaler is not None else None
        for comm, whose in ((self.comm if self.distributed else None, "pipeline ranks"),
                            (self.replica_comm, "data-parallel replicas")):
            if comm is None:
                continue
            states = comm.all_gather_object(mine, f"comparing the {whose}' loss scalers")
            if any(state != states[0] for state in states):
                label = "rank" if comm is self.comm else "replica"
                error = ZbError(f"option 'grad_scaler': the {whose}' GradScalers differ (" + "; ".join(
                    f"{label} {r}: {state if state is not None else 'none, or disabled'}"
                    for r, state in enumerate(states)) + "); give every rank the same scaler (built alike, or "
                    "loaded from the same checkpoint)")
                error.agreed = comm.spans_job  # every rank raised it alike, from gathered values
                raise error

    def stage_done(self, stage: int, grads: dict[int, list[torch.Tensor]]) -> None:
        """The executor ran `stage`'s last action: update it now unless it is its rank's last stage."""
        rank = self.placement[stage]
        if self.finishing.get(rank) == stage:
            return  # the rank's update, after the partial sum arrives (finish)
        indices = self.program.updates.get(stage, [])
        update = self._update(indices, {i: grads[i][0] for i in indices if i in grads})  # [sum over mbs]
        if update is None:
            return
        self._count(rank, update)
        if self.post_validation:
            self._optimistic(update, self.contribution[rank])
        self.updates[rank].append(update)

    def finish(self, grads: list[torch.Tensor | None]) -> None:
        """After the rank's last action (and the tied-gradient sum): the rest of the updates, and the sums."""
        self.steps += 1
        self.optimizer._opt_called = True  # what torch.optim.lr_scheduler checks to know a step was taken
        number = _NUMBERS[self.optimizer] = _NUMBERS.get(self.optimizer, 0) + 1  # counted over every plan
        last = {}
        for rank in self.ranks:
            indices = [i for s in self.program.updates if self.placement[s] == rank and self.finishing[rank] == s
                       for i in self.program.updates[s]]
            indices += [i for i in self.shared_on[rank] if grads[i] is not None]
            last[rank] = self._update(indices, {i: grads[i] for i in indices if grads[i] is not None})
            if last[rank] is not None:
                self._count(rank, last[rank], shared_on=rank)
        if self.owner is not None:  # each replica counted the parameters it owns: their sum is the pipeline's
            for rank in self.ranks:
                self.contribution[rank] = self._replica_sum(self.contribution[rank])
        if not self.post_validation:
            total = self._all_reduce()
            for rank in self.ranks:
                for update in self.updates[rank] + ([last[rank]] if last[rank] else []):
                    self._final(update, total)
            self._record(number, total, rolled_back=0)
            self._publish()
            return
        carry = [0.0, 0.0]
        top = self.num_ranks - 1
        for rank in sorted(self.ranks, reverse=True):
            if rank < top and rank + 1 not in self.ranks:
                carry = self._recv(PARTIAL, rank + 1).tolist()
            carry = [carry[0] + self.contribution[rank][0], max(carry[1], self.contribution[rank][1])]
            if rank > 0 and rank - 1 not in self.ranks:
                self._send(PARTIAL, torch.tensor(carry, dtype=torch.float64), rank - 1)
            if last[rank] is not None:
                self._optimistic(last[rank], carry)
                self.updates[rank].append(last[rank])
        pending = _Pending(number, [u for r in self.ranks for u in self.updates[r] if r != 0])
        if 0 in self.ranks:
            total = (carry[0], bool(carry[1]))
            for other in range(1, self.num_ranks):
                if other not in self.ranks:
                    self._send(FULL, torch.tensor(carry, dtype=torch.float64), other)
            rolled = sum(self._final(u, total) for u in self.updates[0])
            self._record(number, total, rolled)
            pending.total = total
            if pending.updates:  # other ranks of this process validate in the next step's warm-up, as across
                self.pending.append(pending)  # processes
            else:
                self._publish()
        else:
            pending.buffer, pending.work = self._post_recv(FULL, 0)
            self.pending.append(pending)
        if self.pending:
            _UNVALIDATED.add(self)  # alive until validated, even if its plan is replaced (re-partitioning)

    def validate_pending(self) -> None:
        """Apply the global verdict to every update still waiting for it (receiving it from rank 0 if needed)."""
        for send in self.sends:
            self.comm.wait(send, "sending the optimizer's partial norm")
        self.sends = []
        pending, self.pending = self.pending, []
        _UNVALIDATED.discard(self)
        for item in pending:
            if item.total is None:
                self.comm.wait(item.work, "waiting for rank 0's global gradient norm")
                values = item.buffer.tolist()
                item.total = (values[0], bool(values[1]))
                rolled = sum(self._final(u, item.total) for u in item.updates)
                self._record(item.step, item.total, rolled)
            else:
                rolled = sum(self._final(u, item.total) for u in item.updates)
                for record in self.history:
                    if record.step == item.step:
                        record.rolled_back += rolled
            self._publish()

    # Updates ----------------------------------------------------------------------------------------------
    def _all_updated(self) -> list[int]:
        return [i for v in self.program.updates.values() for i in v] + list(self.program.shared_updates)

    def _update(self, indices: list[int], grads: dict[int, torch.Tensor]) -> Update | None:
        """The update of the parameters among `indices` that have a gradient, belong to the optimizer and (with
        shard_optimizer) this replica owns; None when there is none."""
        chosen = [i for i in indices if i in grads and self.params[i] in self.group_of
                  and (self.owner is None or self.owner.get(i, self.replica) == self.replica)]
        if not chosen:
            return None
        return self.updater.make([self.params[i] for i in chosen], [grads[i] for i in chosen], self.unscale)

    def _count(self, rank: int, update: Update, shared_on: int | None = None) -> None:
        """Add the update's squared norm and non-finite flag to the rank's contribution (tied weights once)."""
        shared = {id(self.params[i]) for i, r in self.counted_shared.items() if r != shared_on}
        grads = [g for p, g in zip(update.params, update.grads) if id(p) not in shared]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        squares = float(torch.stack(norms).double().square().sum()) * update.unscale**2  # unscaled
        mine = self.contribution[rank]
        mine[0] += squares
        mine[1] = max(mine[1], float(not math.isfinite(squares)))

    def _optimistic(self, update: Update, known: Sequence[float]) -> None:
        """Update now with what is known so far, unless it already says the step will be clipped or skipped."""
        if self.updater.verdict((known[0], bool(known[1])))[0] != "plain":
            return  # held back until the global values arrive
        self.updater.backup(update)
        self._apply(update, None)

    def _final(self, update: Update, total: tuple[float, bool]) -> int:
        """Bring `update` in line with the global values; returns 1 when an applied update was rolled back."""
        verdict, scale = self.updater.verdict(total)
        rolled = 0
        if update.applied and verdict != "plain":
            self._restore(update)
            rolled = 1
        if not update.applied and verdict != "skip":
            self._apply(update, scale)
        update.backup = None
        update.grads = []
        return rolled

    # (The two places an update changes parameters; tests/distributed/fault_check.py injects failures there.)
    def _apply(self, update: Update, scale: float | None) -> None:
        self.updater.apply(update, scale)

    def _restore(self, update: Update) -> None:
        self.updater.restore(update)

    def _record(self, step: int, total: tuple[float, bool], rolled_back: int) -> None:
        """A step's verdict is known on this process (once per step): its history, and the loss scale's update."""
        verdict, _ = self.updater.verdict(total)
        self.history.append(StepRecord(step, math.sqrt(total[0]) if math.isfinite(total[0]) else math.inf,
                                       verdict == "clip", verdict == "skip", rolled_back))
        if self.scaler is not None:
            self.scaler.load_state_dict(updated_scale(self.scaler.state_dict(), found_inf=verdict == "skip"))

    # Sharded state (shard_optimizer) -------------------------------------------------------------------------
    def _replica_sum(self, contribution: list[float]) -> list[float]:
        squares, bad = _sum_norms(self.replica_comm, contribution, "the replicas' ")
        return [squares, float(bad)]

    def _publish(self) -> None:
        """A validated step: each owner starts broadcasting the parameters it updated to the other replicas, in
        one flat message per owner (and dtype)."""
        if self.owner is None:
            return
        local = {i for s, indices in self.program.updates.items() if self.placement[s] in self.ranks
                 for i in indices}
        local |= {i for r in self.ranks for i in self.shared_on.get(r, [])}
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for i in sorted(local):
            if i in self.owner and self.params[i] in self.group_of:
                p = self.params[i].detach()
                buckets.setdefault((self.owner[i], p.dtype, p.device), []).append(p)
        for (owner, _, _), params in buckets.items():
            flat = torch.cat([p.reshape(-1) for p in params])
            handle = self.replica_comm.start_broadcast(flat, owner, "broadcasting updated parameters from their "
                                                                    "owning replica")
            self.broadcasts.append((handle, owner, params))

    def wait_broadcasts(self) -> None:
        broadcasts, self.broadcasts = self.broadcasts, []
        for handle, owner, params in broadcasts:
            self.replica_comm.wait(handle, "receiving updated parameters from their owning replicas")
            if owner != self.replica:
                values = handle[1].split([p.numel() for p in params])
                torch._foreach_copy_(params, [v.view_as(p) for v, p in zip(values, params)])

    # Messages ---------------------------------------------------------------------------------------------
    def _all_reduce(self) -> tuple[float, bool]:
        mine = [sum(self.contribution[r][0] for r in self.ranks), max(self.contribution[r][1] for r in self.ranks)]
        if not self.distributed:
            return mine[0], bool(mine[1])
        return _sum_norms(self.comm, mine)

    def _send(self, kind: int, tensor: torch.Tensor, dst: int) -> None:
        self.sends.append(self.comm.send_control(kind, tensor, dst))

    def _recv(self, kind: int, src: int) -> torch.Tensor:
        buffer, work = self._post_recv(kind, src)
        self.comm.wait(work, f"waiting for rank {src}'s partial gradient norm")
        return buffer

    def _post_recv(self, kind: int, src: int):
        return self.comm.recv_control(kind, (2,), torch.float64, src)


def _sum_norms(comm, contribution: Sequence[float], whose: str = "") -> tuple[float, bool]:
    """(squared norms summed, any non-finite) of `contribution` = [squares, flag] over every rank of `comm`."""
    squares = comm.all_reduce(torch.tensor([contribution[0]], dtype=torch.float64), f"summing {whose}gradient norms")
    bad = comm.all_reduce(torch.tensor([contribution[1]], dtype=torch.float64),
                          f"checking {whose}gradients for NaN/Inf", op="max")
    return float(squares), bool(bad)


# Every OptimizerStep of an optimizer, so that its state_dict(), load_state_dict() and zb.synchronize() see
# validated values.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNVALIDATED: set = set()
_NUMBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HISTORY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def history(optimizer: torch.optim.Optimizer) -> list[StepRecord]:
    """What each validated step zb ran with `optimizer` did: its global gradient norm, clipped, skipped, and
    how many early updates this process rolled back."""
    return _HISTORY.setdefault(optimizer, [])


def _register(step: OptimizerStep) -> None:
    optimizer = step.optimizer
    if optimizer not in _STEPS:
        _STEPS[optimizer] = weakref.WeakSet()
        optimizer.register_state_dict_pre_hook(lambda opt: synchronize(opt))
        optimizer.register_load_state_dict_pre_hook(lambda opt, state: synchronize(opt))
    _STEPS[optimizer].add(step)


def full_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with the state of every parameter this pipeline rank updates, also those other
    replicas own under `shard_optimizer` (gathered over the replica group, on CPU: call it on every rank).
    Without sharded state it is `optimizer.state_dict()`. A rank's own `state_dict()` holds only its shard."""
    state = optimizer.state_dict()  # validates pending steps first
    sharded = [s for s in _STEPS.get(optimizer, ()) if s.owner is not None]
    if not sharded:
        return state
    mine = {i: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            for i, values in state["state"].items()}
    everyone = sharded[0].replica_comm.all_gather_object(mine, "gathering the optimizer state of every replica")
    merged = {}
    for theirs in everyone:
        merged.update(theirs)
    state["state"] = dict(sorted(merged.items()))
    return state


def settle() -> None:
    """Validate every step of every optimizer zb ran that is still waiting (checkpoints call it: a pending update
    validated after a load would roll back onto the loaded values, and a loss scale is updated on validation)."""
    for optimizer in list(_STEPS.keys()):  # (a step waiting in _UNVALIDATED keeps its optimizer registered here)
        synchronize(optimizer)


def synchronize(optimizer: torch.optim.Optimizer) -> None:
    """Validate every step zb took with `optimizer` that is still waiting for the global gradient norm.

    Under post-validation, ranks other than 0 learn whether their last step had to be clipped or skipped
    during the next step; call this before reading parameters after the last step (evaluation, saving the
    model). `optimizer.state_dict()` and `load_state_dict()` call it themselves.
    """
    steps = set(_STEPS.get(optimizer, ())) | {s for s in _UNVALIDATED if s.optimizer is optimizer}
    for step in steps:
        step.validate_pending()
        step.wait_broadcasts()
