"""Data parallelism: D replicas of the pipeline, each stage's parameter gradients summed over its replica group
inside the schedule.

Every replica runs the same program on its own batch. The loss is made global before anything runs: each
microbatch's loss weight divides by the token count (or batch size) of all replicas' batches together
(runtime/replicas.py `Replicas.global_totals`), so that summing the replicas' gradients gives eager's gradient on
the concatenated batch, with no division afterwards. The sum itself is the schedule's R action: right after a
stage's last W its gradients start reducing over the replica group (bucketed, asynchronously, while the rest of
the pipeline computes), and the stage's fused update runs once its own reduction has landed (`poll`).
Gradients several stages produce (tied weights) are summed at the end of the step, after the pipeline's own sum.

With `shard_optimizer`, each parameter has one owning replica (`owners`, balanced by bytes): its gradient is
reduced to the owner only (a reduce, the per-parameter form of a reduce-scatter), only the owner keeps optimizer
state for it and updates it, and then broadcasts the new value to the others.

Without a process group the replicas run one after another in this process (`LocalReduction`): the earlier
ones leave their gradients here and the last one completes every sum, so one process checks the same arithmetic.
The replicas' outputs combine by the same rules as microbatches (runtime/combine.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from zb.codegen.program import Program
from zb.core.errors import ZbError
from zb.runtime.microbatch import fingerprint
from zb.runtime.released import is_released

BUCKET_BYTES = 25 * 2**20  # gradients are reduced in flat buckets of at most this size (DDP's default)


def stage_gradients(program: Program) -> tuple[dict[int, list[int]], list[int]]:
    """(stage -> the summed-gradient inputs only that stage produces, the inputs several stages produce)."""
    own: dict[int, list[int]] = {s: [] for s in range(program.num_stages)}
    shared = []
    for index, stages in program.grad_producers.items():
        if program.inputs[index].batched:
            continue  # a batched input's gradient belongs to this replica's samples: nothing to sum
        if len(stages) == 1:
            own[next(iter(stages))].append(index)
        else:
            shared.append(index)
    return own, shared


def owners(program: Program, indices: Sequence[int], replicas: int) -> dict[int, int]:
    """Parameter index -> the replica that owns its optimizer state: largest first to the least loaded replica.
    Every replica computes the same table from the program alone."""
    load = [0] * replicas
    table = {}
    sizes = {i: _numel(program, i) for i in indices}
    for index in sorted(indices, key=lambda i: (-sizes[i], i)):
        replica = min(range(replicas), key=lambda r: (load[r], r))
        table[index] = replica
        load[replica] += sizes[index]
    return table


def _numel(program: Program, index: int) -> int:
    spec = program.input_specs[index]
    return 0 if spec is None else spec.nbytes


@dataclass
class _Bucket:
    """One flat bucket of a stage's gradients in flight over the replica group."""

    stage: int
    indices: list[int]
    flat: torch.Tensor
    handle: Any
    owner: int | None  # the replica the bucket is reduced to (shard_optimizer), None: all-reduced


class GradientReduction:
    """Sums gradients over the replica group (`comm`, a DistributedComm over it) as the R actions say."""

    def __init__(self, program: Program, comm, replica: int, owner: dict[int, int] | None = None):
        self.program, self.comm, self.replica, self.owner = program, comm, replica, owner
        self.own, self.shared = stage_gradients(program)
        self.pending: deque[_Bucket] = deque()
        self.waiting: dict[int, int] = {}  # stage -> buckets still in flight

    def launch(self, stage: int, grads: dict[int, list[torch.Tensor]]) -> None:
        """Start reducing `stage`'s gradients (its R action); returns at once."""
        indices = [i for i in self.own[stage] if i in grads]
        buckets = _buckets(indices, grads, self.owner)
        self.waiting[stage] = len(buckets)
        for owner, bucket in buckets:
            flat = torch.cat([grads[i][0].reshape(-1) for i in bucket])
            what = f"summing stage {stage}'s gradients over the replicas"
            handle = (self.comm.start_all_reduce(flat, what) if owner is None
                      else self.comm.start_reduce(flat, owner, what))
            self.pending.append(_Bucket(stage, bucket, flat, handle, owner))

    def poll(self, grads: dict[int, list[torch.Tensor]], block: bool = False) -> list[int]:
        """Take in every reduction that has landed (all of them with `block`); returns the stages now complete."""
        complete = []
        while self.pending and (block or self.comm.completed(self.pending[0].handle)):
            bucket = self.pending.popleft()
            self.comm.wait(bucket.handle, f"summing stage {bucket.stage}'s gradients over the replicas")
            self._unpack(bucket, grads)
            self.waiting[bucket.stage] -= 1
            if self.waiting[bucket.stage] == 0:
                complete.append(bucket.stage)
        complete += [s for s, n in self.waiting.items() if n == 0 and s not in complete]
        for stage in complete:
            self.waiting.pop(stage, None)
        return complete

    def _unpack(self, bucket: _Bucket, grads: dict[int, list[torch.Tensor]]) -> None:
        offset = 0
        mine = bucket.owner is None or bucket.owner == self.replica
        for i in bucket.indices:
            g = grads[i][0]
            if mine:
                grads[i] = [bucket.flat[offset: offset + g.numel()].view_as(g)]
            else:
                del grads[i]  # another replica owns it: its sum is there, not here
            offset += g.numel()

    def reduce_shared(self, grads: list[torch.Tensor | None]) -> None:
        """After the step: the gradients several stages produce, summed over the replicas (to their owner)."""
        for i in self.shared:
            if grads[i] is None:
                continue
            what = f"summing the gradient of {self.program.inputs[i].name} over the replicas"
            owner = None if self.owner is None else self.owner.get(i)
            if owner is None:
                grads[i] = self.comm.all_reduce(grads[i].clone(), what)
            else:
                handle = self.comm.start_reduce(grads[i].clone(), owner, what)
                self.comm.wait(handle, what)
                grads[i] = handle[1] if owner == self.replica else None


class LocalReduction:
    """The replicas of one process, run one after another: replica r < D-1 leaves its gradients in `partial`;
    the last replica's R actions complete the sums at once."""

    def __init__(self, program: Program, replicas: int):
        self.program, self.replicas = program, replicas
        self.own, self.shared = stage_gradients(program)
        self.replica = 0
        self.partial: dict[int, torch.Tensor] = {}
        self.done: list[int] = []

    def begin(self, replica: int) -> None:
        self.replica = replica
        if replica == 0:
            self.partial = {}

    @property
    def last(self) -> bool:
        return self.replica == self.replicas - 1

    def launch(self, stage: int, grads: dict[int, list[torch.Tensor]]) -> None:
        for i in self.own[stage]:
            if i in grads:
                total = self._add(i, grads[i][0])
                if total is not None:
                    grads[i] = [total]
        if self.last:
            self.done.append(stage)

    def _add(self, i: int, g: torch.Tensor) -> torch.Tensor | None:
        """Add this replica's gradient of input `i`: the sum over every replica from the last one (which forgets the
        partial sum: nothing is held between steps), else None."""
        if self.last:
            earlier = self.partial.pop(i, None)
            return g if earlier is None else earlier + g
        self.partial[i] = self.partial[i] + g if i in self.partial else g
        return None

    def poll(self, grads, block: bool = False) -> list[int]:
        done, self.done = self.done, []
        return done

    def reduce_shared(self, grads: list[torch.Tensor | None]) -> None:
        for i in self.shared:
            total = self._add(i, grads[i]) if grads[i] is not None else None
            if total is not None:
                grads[i] = total


def _buckets(indices: list[int], grads, owner: dict[int, int] | None) -> list[tuple[int | None, list[int]]]:
    """Consecutive gradients of one dtype, device (and owner) in flat buckets of at most BUCKET_BYTES."""
    buckets: list[tuple[Any, list[int], int]] = []
    for i in indices:
        g = grads[i][0]
        key = (g.dtype, g.device, None if owner is None else owner.get(i))
        size = g.numel() * g.element_size()
        if buckets and buckets[-1][0] == key and buckets[-1][2] + size <= BUCKET_BYTES:
            buckets[-1][1].append(i)
            buckets[-1] = (key, buckets[-1][1], buckets[-1][2] + size)
        else:
            buckets.append((key, [i], size))
    return [(key[2], bucket) for key, bucket, _ in buckets]


def check_same_weights(comm, program: Program, args: Sequence[Any]) -> None:
    """Every replica must start from the same parameters and buffers: compare their checksums (first step)."""
    specs = [s for s in program.inputs if s.kind in ("parameter", "buffer") and not is_released(args[s.index])]
    values = [args[s.index] for s in specs]
    mine = fingerprint([replace(s, batched=True) for s in specs], values).view(torch.int64)  # checksums all
    if mine.numel() == 0:
        return
    everyone = comm.all_gather(mine, "comparing the replicas' weights")
    for other, theirs in enumerate(everyone):
        differs = [s.name for s, a, b in zip(specs, everyone[0].tolist(), theirs.tolist()) if a != b]
        if differs:
            error = ZbError(
                f"data-parallel replicas start from different weights: {differs[0]!r} differs between replica 0 "
                f"and replica {other}{f' (and {len(differs) - 1} more)' if len(differs) > 1 else ''}. Build the "
                "model with the same seed on every rank (torch.manual_seed before creating it) or load the same "
                "checkpoint everywhere before the first step"
            )
            error.agreed = comm.spans_job  # every rank saw the same gathered checksums
            raise error

