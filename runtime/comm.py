"""Every message between pipeline ranks: boundary tensors, control messages and collectives, with one timeout.

Two implementations of one interface:
  * `LocalComm`: every rank of the pipeline lives in this process (the in-process debugging mode, and one
    stage); a send stores the tensors and a receive takes them; collectives have nobody else to wait for.
  * `DistributedComm`: over a torch.distributed process group. Every wait (a receive, a send's completion, a
    collective) is bounded by the `timeout` option, so a rank that died or raised makes its peers raise a
    `ZbError` naming it within that time, not after the process group's default. Buffers are allocated on the
    device the pipeline runs on (the stage's device for boundary tensors), so NCCL works as gloo does.

A failure anywhere reaches every rank within a fraction of a second (`Failures`): the rank that raises writes
its error under the job's failure key in its store (the key-value store torch.distributed started with), and
every wait polls that key while it waits, so its peers raise a `ZbPeerError` naming the failed rank and its error
instead of waiting out the timeout. From then on every pipeline of the job refuses every call at once: receives
posted for the abandoned step cannot be taken back (neither gloo nor NCCL cancels them), so no later message could
be trusted to meet its own receive. An error every rank raises alike from gathered data (`ZbError.agreed`: ranks
handed different batches) leaves nothing outstanding and ends nothing.

Boundary tensors travel as the executor's communication program says (schedules/p2p.py): a `Batch` of sends
and receives is posted together (`post`, one `batch_isend_irecv`), and the executor waits for the batch that
brought a value right before the action that reads it (`arrived`, then `take`). Nothing relies on tags: every
message uses tag 0 and is matched by its order between the two ranks, as NCCL matches (the program makes both
sides issue the same order; `LocalComm` checks it). A receive buffer exists from its post until the value's last
reader is done with it; a sent tensor is dropped as soon as its batch has completed (`release_sent`). Control
messages (the optimizer's norms, parameter migration) go the same way, one operation per batch, in an order
both sides derive from the same data.

On gloo a work completes only inside its own `wait`, which nothing interrupts: such waits, and store calls, run on
threads of runtime/comm_threads.py, which this module waits for under its timeout and which end in order at exit.
"""

from __future__ import annotations

import datetime
import os
import pickle
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from zb.core import torch_internals
from zb.core.errors import ZbError, ZbPeerError
from zb.runtime.comm_threads import Waiter, aside, hand
from zb.schedules.p2p import SEND, NcclModel, Op


class LocalComm:
    """All ranks in one process, under NCCL's point-to-point rules (schedules/p2p.py `NcclModel`): each rank's
    operations complete in the order it posted them, a send meets the receive its peer posted in the same place of
    their order (a different message there is an error), and a value is there only once its whole batch is."""

    distributed = False

    def __init__(self):
        self.box: dict[Any, list[torch.Tensor]] = {}
        self.model = NcclModel()

    # Boundary tensors ---------------------------------------------------------------------------------------
    def post(self, rank: int, ops: Sequence[Op], payloads: Sequence[Any], specs: Sequence[Any]) -> list:
        """Issue `ops` (one batch) for `rank`: sends carry `payloads` (lists of tensors); returns one handle per op."""
        group = self.model.post((0, rank), list(ops), list(payloads))
        self.model.progress()
        return [group] * len(group)

    def arrived(self, handle) -> bool:
        """Whether the batch `handle` belongs to has completed (never waits: the executor runs another rank)."""
        self.model.progress()
        return all(p.done for p in handle)

    def take(self, handle, op: Op) -> list[torch.Tensor]:
        return next(p for p in handle if p.op == op).payload

    def release_sent(self) -> None:
        pass

    def finish(self) -> None:
        self.model.progress()
        blocked = self.model.blocked()
        if blocked:
            raise ZbError(f"the step ended with point-to-point operations pending: {'; '.join(blocked)}")

    # Control messages ----------------------------------------------------------------------------------------
    def send_control(self, kind: int, tensor: torch.Tensor, dst: int):
        self.box[("control", kind)] = [tensor.clone()]
        return None

    def recv_control(self, kind: int, shape: tuple, dtype: torch.dtype, src: int):
        if ("control", kind) not in self.box:
            raise ZbError(f"rank {src} sent no control message {kind}; the ranks disagree on the step")
        return self.box.pop(("control", kind))[0], None

    def wait(self, handle, what: str) -> None:
        pass  # in memory, a message is there as soon as it is sent

    # Collectives: every rank is here, so there is nothing to combine ---------------------------------------
    def all_reduce(self, tensor: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        return [tensor]

    def all_gather_object(self, value: Any, what: str) -> list[Any]:
        return [value]

    def broadcast_object(self, value: Any, src: int, what: str) -> Any:
        return value

    def barrier(self, what: str) -> None:
        pass


POLL = 0.05  # seconds between two looks at the failure key while waiting


class Failures:
    """The job's failure key in its store: the first failing rank's error, for every rank to see. One key for the
    whole job: every pipeline of the job shares its process groups, so a step abandoned in one leaves operations
    posted that any other would meet."""

    def __init__(self, store):
        self.store = store
        # torchrun's restart count: a restarted job starts clean even if its store outlived the failed attempt
        self.key = f"zb/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.known: str | None = None
        self._probe: threading.Thread | None = None

    @classmethod
    def for_job(cls) -> Failures | None:
        """The key in the store of the default process group (None without one); one object per store."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        # Private, and the one place zb reads it: the store torch.distributed was initialised with (torchrun's
        # rendezvous store, or the user's), which every process of the job can reach without communication.
        store = torch_internals.default_store()
        if store is None:
            return None
        if id(store) not in _FAILURES:
            _FAILURES[id(store)] = cls(store)
        return _FAILURES[id(store)]

    def announce(self, rank: int, error: BaseException) -> None:
        """Record that global rank `rank` failed with `error`; the first failure recorded stays. Errors every rank
        raised alike with nothing outstanding (`ZbError.agreed`) and peers' failures are not recorded."""
        if self.known is not None or isinstance(error, ZbPeerError) or getattr(error, "agreed", False):
            return
        lines = str(error).strip().splitlines()
        text = f"{rank}\n{type(error).__name__}: {lines[0] if lines else ''}"[:2000]
        self.known = _describe(text)  # this rank refuses its later calls even if the store cannot be written

        def record():
            try:
                self.known = _describe(self.store.compare_set(self.key, "", text).decode())  # the first recorded
            except Exception:  # noqa: BLE001  (the store itself is gone: the peers will time out instead)
                pass

        aside(record, STORE_WAIT)

    def check(self) -> str | None:
        """The recorded failure, if any. The store is asked on a daemon thread, waited for at most POLL seconds:
        a store whose host is unreachable cannot stretch a wait past zb's timeout (the next look asks again)."""
        if self.known is None and (self._probe is None or not self._probe.is_alive()):
            self._probe = aside(self._look, POLL)
        return self.known

    def _look(self) -> None:
        try:
            if self.store.check([self.key]):
                self.known = _describe(self.store.get(self.key).decode())
        except Exception:  # noqa: BLE001  (the store's host is gone: the job is ending)
            pass

    def raise_if_failed(self, what: str) -> None:
        failure = self.check()
        if failure is not None:
            raise ZbPeerError(f"{failure}; this rank stops {what}. The job's pipelines are unusable from now on "
                              "(operations posted for the abandoned step cannot be cancelled): restart the processes "
                              "(for example with torchrun --max-restarts) after fixing the cause")


_FAILURES: dict[int, Failures] = {}
STORE_WAIT = 1.0  # seconds a failing rank waits for its error to be recorded before it raises


def _describe(record: str) -> str:
    rank, _, text = record.partition("\n")
    return f"global rank {rank} failed with {text}"


class DistributedComm:
    """Carries boundary tensors, control messages and collectives over a process group, every wait bounded by
    the timeout and watching the failure key; `device` is where collective and control buffers live (a CUDA
    device with NCCL)."""

    distributed = True

    def __init__(self, group, timeout: float, device: torch.device | str = "cpu", role: str = "pipeline",
                 failures: Failures | None = None):
        """`role` names the group in errors: "pipeline" (its stages' ranks) or "replica" (data parallelism);
        `failures`: the pipeline's failure key, polled while waiting."""
        import torch.distributed as dist

        self.failures = failures
        self.gloo = dist.get_backend(group) == "gloo"
        self.role = role
        self.dist = dist
        self.group = group
        # The group object itself (the default group's too): still reachable at exit, after destroy_process_group.
        self.process_group = group if group is not None else dist.group.WORLD
        self.timeout = datetime.timedelta(seconds=timeout)
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.pending: list[_Batch] = []  # batches with sends not known to be complete
        if self.gloo:
            hand()  # (at exit, comm_threads._settle gives gloo's worker threads time to let go of what they hold)

    @property
    def spans_job(self) -> bool:
        """Whether this group holds every process of the job (an error all of it raises alike ends nothing)."""
        return self.world == self.dist.get_world_size()

    def _peer(self, rank: int) -> int:
        return self.dist.get_global_rank(self.group, rank) if self.group is not None else rank

    # Boundary tensors ---------------------------------------------------------------------------------------
    def post(self, rank: int, ops: Sequence[Op], payloads: Sequence[Any], specs: Sequence[Any]) -> list:
        """Issue `ops` as one `batch_isend_irecv` (tag 0: matched by order); a receive's buffers are allocated now.
        Returns one handle per op: (the batch, the op's tensors)."""
        p2p, tensors = [], []
        for op, payload, spec in zip(ops, payloads, specs):
            if op.kind == SEND:
                mine = [t.contiguous() for t in payload]
                p2p += [self.dist.P2POp(self.dist.isend, t, self._peer(op.peer), self.group) for t in mine]
            else:
                mine = [s.empty() for s in spec]
                p2p += [self.dist.P2POp(self.dist.irecv, t, self._peer(op.peer), self.group) for t in mine]
            tensors.append(mine)
        works = self.dist.batch_isend_irecv(p2p) if p2p else []
        batch = _Batch(works, sorted({op.peer for op in ops}), [str(op) for op in ops],
                       [t for op, mine in zip(ops, tensors) if op.kind == SEND for t in mine],
                       Waiter(works, self, sorted({op.peer for op in ops}))
                       if self.gloo and works else None)
        if any(op.kind == SEND for op in ops):
            self.pending.append(batch)
        return [(batch, mine) for mine in tensors]

    def arrived(self, handle) -> bool:
        """Wait (bounded by the timeout) for the whole batch `handle` came in, as NCCL completes a batch at once."""
        batch, _ = handle
        if not batch.done:
            self._wait(batch.waiter or batch.works, "exchanging " + ", ".join(batch.what), batch.peers)
            batch.done = True
        return True

    def take(self, handle, op: Op) -> list[torch.Tensor]:
        return handle[1]

    def release_sent(self) -> None:
        """Drop the batches whose sends have completed, and with them the sent tensors: NCCL reports it through
        `is_completed`; a gloo work completes only inside its `wait`, which the batch's waiter thread runs."""
        self.pending = [b for b in self.pending if not b.completed()]

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        for batch in pending:
            self.arrived((batch, None))

    # Control messages ----------------------------------------------------------------------------------------
    def send_control(self, kind: int, tensor: torch.Tensor, dst: int):
        """A small message outside the schedule (one operation in a batch, matched by order: `kind` only names
        it); returns the handle to wait for."""
        tensor = tensor.to(self.device).contiguous()
        works = self.dist.batch_isend_irecv([self.dist.P2POp(self.dist.isend, tensor, self._peer(dst), self.group)])
        return works, tensor, [dst]

    def recv_control(self, kind: int, shape: tuple, dtype: torch.dtype, src: int):
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        works = self.dist.batch_isend_irecv([self.dist.P2POp(self.dist.irecv, buffer, self._peer(src), self.group)])
        return buffer, (works, buffer, [src])

    def wait(self, handle, what: str) -> None:
        work, _, peers = handle
        self._wait(work, what, peers)

    # Collectives ---------------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over every rank (in place where it already lives on the comm's device)."""
        buffer = tensor.to(self.device)
        reduce = {"sum": self.dist.ReduceOp.SUM, "max": self.dist.ReduceOp.MAX}[op]
        work = self.dist.all_reduce(buffer, op=reduce, group=self.group, async_op=True)
        self._handed(buffer)
        self._wait(work, what, self._others())
        return buffer

    def start_all_reduce(self, tensor: torch.Tensor, what: str):
        """Start summing `tensor` over every rank in place (it must live on the comm's device); returns the handle
        for `completed` and `wait`, whose [1] is the tensor."""
        work = self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._handed(tensor)
        return work, tensor, self._others()

    def start_reduce(self, tensor: torch.Tensor, dst: int, what: str):
        """Start summing `tensor` over every rank into rank `dst`'s (in place; the others' become undefined)."""
        work = self.dist.reduce(tensor, self._peer(dst), op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._handed(tensor)
        return work, tensor, self._others()

    def start_broadcast(self, tensor: torch.Tensor, src: int, what: str):
        """Start sending rank `src`'s `tensor` into every other rank's (in place)."""
        work = self.dist.broadcast(tensor, src=self._peer(src), group=self.group, async_op=True)
        self._handed(tensor)
        return work, tensor, [src] if src != self.rank else self._others()

    def completed(self, handle) -> bool:
        """Whether a started collective has finished (never waits)."""
        return handle[0].is_completed()

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        buffer = tensor.to(self.device).contiguous()
        work = self.dist.broadcast(buffer, src=self._peer(src), group=self.group, async_op=True)
        self._handed(buffer)
        self._wait(work, what, [src] if src != self.rank else self._others())
        return buffer

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's `tensor` (the same shape and dtype on each), in rank order."""
        buffer = tensor.to(self.device).contiguous()
        gathered = [torch.empty_like(buffer) for _ in range(self.world)]
        work = self.dist.all_gather(gathered, buffer, group=self.group, async_op=True)
        self._handed(buffer, *gathered)
        self._wait(work, what, self._others())
        return gathered

    def all_gather_object(self, value: Any, what: str) -> list[Any]:
        """Every rank's `value` (picklable), in rank order: sizes first, then the padded bytes."""
        data = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        size = torch.tensor([data.numel()], device=self.device)
        work = self.dist.all_gather(sizes, size, group=self.group, async_op=True)
        self._handed(size, *sizes)
        self._wait(work, what, self._others())
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: data.numel()] = data
        gathered = [torch.empty(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        work = self.dist.all_gather(gathered, padded, group=self.group, async_op=True)
        self._handed(padded, *gathered)
        self._wait(work, what, self._others())
        return [pickle.loads(g[: int(s)].cpu().numpy().tobytes()) for g, s in zip(gathered, sizes)]

    def broadcast_object(self, value: Any, src: int, what: str) -> Any:
        """Rank `src`'s `value` (picklable) on every rank."""
        mine = self.rank == src
        data = pickle.dumps(value) if mine else b""
        size = self.broadcast(torch.tensor([len(data)], dtype=torch.int64), src, what)
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if mine
                  else torch.empty(int(size), dtype=torch.uint8))
        buffer = self.broadcast(buffer, src, what)
        return value if mine else pickle.loads(buffer.cpu().numpy().tobytes())

    def barrier(self, what: str) -> None:
        """Every rank reaches this point, or a `ZbError` within the timeout."""
        self.all_reduce(torch.zeros(1), what)

    # Waiting ---------------------------------------------------------------------------------------------------
    def _handed(self, *tensors: torch.Tensor) -> None:
        if self.gloo:  # (a collective runs on gloo's own worker thread: see runtime/comm_threads.py)
            hand(*tensors)

    def _others(self) -> list[int]:
        return [r for r in range(self.world) if r != self.rank]

    def _wait(self, work, what: str, peers: Sequence[int]) -> None:
        """Wait for `work` until the timeout, looking at the failure key every POLL seconds meanwhile."""
        if isinstance(work, list):  # a batch's works
            for one in work:
                self._wait(one, what, peers)
            return
        try:
            if isinstance(work, Waiter):
                self._await(work, what)
            elif self.gloo:
                self._await(Waiter([work], self, peers), what)
            else:
                self._poll(work, what)
                work.wait()  # complete: makes the current CUDA stream wait for it (NCCL)
        except RuntimeError as e:
            if isinstance(e, ZbPeerError):
                raise
            if self.failures is not None:  # the peer said why before it went (its connection closed, ...)
                self.failures.raise_if_failed(what)
            who = f"rank {peers[0]}" if len(peers) == 1 else f"one of ranks {list(peers)}"
            globals_ = [self._peer(p) for p in peers]
            if globals_ != list(peers):
                who += f" (global rank{'s' if len(peers) > 1 else ''} {', '.join(map(str, globals_))})"
            raise ZbError(f"{self.role} peer {who} failed while {what}: {e}. A rank died or is stuck; the step is "
                          f"abandoned (timeout {self.timeout.total_seconds():g} s, option 'timeout')") from e

    def _await(self, waiter: Waiter, what: str) -> None:
        """gloo: wait for `waiter`'s thread, at most the timeout from now, while this thread watches the failure key
        every POLL seconds. A thread given up on is left waiting (runtime/comm_threads.py `_settle` ends it at exit)."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not waiter.done.wait(POLL):
            if self.failures is not None:
                self.failures.raise_if_failed(what)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer within {self.timeout.total_seconds():g} s")
        if waiter.failed:
            raise waiter.failed[0]

    def _poll(self, work, what: str) -> None:
        """NCCL: `is_completed` asks the device without blocking; the failure key is read every POLL seconds."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        pause, look = 2e-5, time.monotonic() + POLL
        while not work.is_completed():
            now = time.monotonic()
            if now >= look:
                if self.failures is not None:
                    self.failures.raise_if_failed(what)
                look = now + POLL
            if now > deadline:
                raise RuntimeError(f"no answer within {self.timeout.total_seconds():g} s")
            time.sleep(pause)
            pause = min(2 * pause, 2e-3)




class _Batch:
    """One posted `batch_isend_irecv`: its works, the peers it talks to, what it moves (for errors), the tensors it
    sends (alive until the batch is dropped) and, on gloo, the thread that waits for it."""

    def __init__(self, works: list, peers: list[int], what: list[str], sent: list[torch.Tensor],
                 waiter: Waiter | None):
        self.works, self.peers, self.what, self.sent, self.waiter = works, peers, what, sent, waiter
        self.done = False

    def completed(self) -> bool:
        """Whether every operation of the batch has completed (never waits); a failed one has not."""
        if self.waiter is not None:
            return self.waiter.done.is_set() and not self.waiter.failed
        return all(work.is_completed() for work in self.works)
