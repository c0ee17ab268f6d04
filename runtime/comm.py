"""Every message between pipeline ranks: boundary tensors, control messages and collectives, with one timeout.

Two implementations of one interface:
  * `LocalComm`: every rank of the pipeline lives in this process (the in-process debugging mode, and one
    stage); a send stores the tensors and a receive takes them; collectives have nobody else to wait for.
  * `DistributedComm`: over a torch.distributed process group. Every wait (a receive, a send's completion, a
    collective) is bounded by the `timeout` option, so a rank that died or raised makes its peers raise a
    `ZbError` naming it within that time, not after the process group's default. Buffers are allocated on the
    device the pipeline runs on (the stage's device for boundary tensors), so NCCL works as gloo does.

Tags. A boundary message is (direction, stage, microbatch); its i-th tensor travels under
`message * stride + i`, where `stride` exceeds the largest tensor count of any boundary of the program (set by
the executor), so no two tensors of a step share a tag whatever the counts. Control messages (the optimizer's
norms, migration) use `CONTROL + kind`, above every data tag.
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Sequence
from typing import Any

import torch

from zb.core.errors import ZbError

CONTROL = 1 << 30  # control tags start here; data tags stay below


def message_id(backward: bool, stage: int, microbatch: int, num_stages: int) -> int:
    return (microbatch * num_stages + stage) * 2 + int(backward)


class LocalComm:
    """All ranks in one process."""

    distributed = False

    def __init__(self):
        self.box: dict[Any, list[torch.Tensor]] = {}
        self.stride = 1

    # Boundary tensors ---------------------------------------------------------------------------------------
    def send(self, message: int, tensors: Sequence[torch.Tensor], dst: int) -> None:
        self.box[message] = list(tensors)

    def prepare(self, receives: Sequence[tuple[int, Sequence[Any], int]]) -> None:
        pass  # messages are stored by the send itself

    def ready(self, message: int) -> bool:
        return message in self.box

    def recv(self, message: int, specs: Sequence[Any], src: int) -> list[torch.Tensor]:
        return self.box.pop(message)

    def finish(self) -> None:
        if self.box:
            raise ZbError(f"{len(self.box)} messages were sent but never received; the schedule is inconsistent")

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


class DistributedComm:
    """Over a process group; `device` is where collective and control buffers live (a CUDA device with NCCL)."""

    distributed = True

    def __init__(self, group, timeout: float, device: torch.device | str = "cpu", role: str = "pipeline"):
        """`role` names the group in errors: "pipeline" (its stages' ranks) or "replica" (data parallelism)."""
        import torch.distributed as dist

        self.role = role
        self.dist = dist
        self.group = group
        self.timeout = datetime.timedelta(seconds=timeout)
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.stride = 1
        self.pending: list = []
        self.posted: dict[int, tuple[list[torch.Tensor], list, int]] = {}

    def _peer(self, rank: int) -> int:
        return self.dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _tag(self, message: int, i: int) -> int:
        tag = message * self.stride + i
        if tag >= CONTROL:
            raise ZbError(f"message {message} of this pipeline has no tag below {CONTROL}: too many stages x "
                          "microbatches x boundary tensors")
        return tag

    # Boundary tensors ---------------------------------------------------------------------------------------
    def send(self, message: int, tensors: Sequence[torch.Tensor], dst: int) -> None:
        for i, tensor in enumerate(tensors):
            tensor = tensor.contiguous()
            work = self.dist.isend(tensor, self._peer(dst), group=self.group, tag=self._tag(message, i))
            self.pending.append((work, tensor, dst))

    def ready(self, message: int) -> bool:
        return True  # a receive blocks until the data arrives (or the timeout passes)

    def prepare(self, receives: Sequence[tuple[int, Sequence[Any], int]]) -> None:
        """Post every receive of the step at its start, into preallocated buffers: data lands as soon as it is
        sent, so a transfer's latency stays off the critical path."""
        for message, specs, src in receives:
            self.posted[message] = self._post(message, specs, src)

    def _post(self, message: int, specs: Sequence[Any], src: int):
        buffers = [spec.empty() for spec in specs]
        works = [self.dist.irecv(b, self._peer(src), group=self.group, tag=self._tag(message, i))
                 for i, b in enumerate(buffers)]
        return buffers, works, src

    def recv(self, message: int, specs: Sequence[Any], src: int) -> list[torch.Tensor]:
        buffers, works, src = self.posted.pop(message) if message in self.posted else self._post(message, specs, src)
        for work in works:
            self._wait(work, f"receiving from rank {src}", [src])
        return buffers

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        for work, _, dst in pending:
            self._wait(work, f"sending to rank {dst}", [dst])

    # Control messages ----------------------------------------------------------------------------------------
    def send_control(self, kind: int, tensor: torch.Tensor, dst: int):
        """A small message outside the schedule; returns the handle to wait for."""
        tensor = tensor.to(self.device).contiguous()
        return self.dist.isend(tensor, self._peer(dst), group=self.group, tag=CONTROL + kind), tensor, [dst]

    def recv_control(self, kind: int, shape: tuple, dtype: torch.dtype, src: int):
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer, (self.dist.irecv(buffer, self._peer(src), group=self.group, tag=CONTROL + kind), buffer,
                        [src])

    def wait(self, handle, what: str) -> None:
        work, _, peers = handle
        self._wait(work, what, peers)

    # Collectives ---------------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over every rank (in place where it already lives on the comm's device)."""
        buffer = tensor.to(self.device)
        reduce = {"sum": self.dist.ReduceOp.SUM, "max": self.dist.ReduceOp.MAX}[op]
        work = self.dist.all_reduce(buffer, op=reduce, group=self.group, async_op=True)
        self._wait(work, what, self._others())
        return buffer

    def start_all_reduce(self, tensor: torch.Tensor, what: str):
        """Start summing `tensor` over every rank in place (it must live on the comm's device); returns the handle
        for `completed` and `wait`, whose [1] is the tensor."""
        work = self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
        return work, tensor, self._others()

    def start_reduce(self, tensor: torch.Tensor, dst: int, what: str):
        """Start summing `tensor` over every rank into rank `dst`'s (in place; the others' become undefined)."""
        work = self.dist.reduce(tensor, self._peer(dst), op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
        return work, tensor, self._others()

    def start_broadcast(self, tensor: torch.Tensor, src: int, what: str):
        """Start sending rank `src`'s `tensor` into every other rank's (in place)."""
        work = self.dist.broadcast(tensor, src=self._peer(src), group=self.group, async_op=True)
        return work, tensor, [src] if src != self.rank else self._others()

    def completed(self, handle) -> bool:
        """Whether a started collective has finished (never waits)."""
        return handle[0].is_completed()

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        buffer = tensor.to(self.device).contiguous()
        work = self.dist.broadcast(buffer, src=self._peer(src), group=self.group, async_op=True)
        self._wait(work, what, [src] if src != self.rank else self._others())
        return buffer

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's `tensor` (the same shape and dtype on each), in rank order."""
        buffer = tensor.to(self.device).contiguous()
        gathered = [torch.empty_like(buffer) for _ in range(self.world)]
        work = self.dist.all_gather(gathered, buffer, group=self.group, async_op=True)
        self._wait(work, what, self._others())
        return gathered

    def all_gather_object(self, value: Any, what: str) -> list[Any]:
        """Every rank's `value` (picklable), in rank order: sizes first, then the padded bytes."""
        data = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        work = self.dist.all_gather(sizes, torch.tensor([data.numel()], device=self.device), group=self.group,
                                    async_op=True)
        self._wait(work, what, self._others())
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: data.numel()] = data
        gathered = [torch.empty(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        work = self.dist.all_gather(gathered, padded, group=self.group, async_op=True)
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
    def _others(self) -> list[int]:
        return [r for r in range(self.world) if r != self.rank]

    def _wait(self, work, what: str, peers: Sequence[int]) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            who = f"rank {peers[0]}" if len(peers) == 1 else f"one of ranks {list(peers)}"
            globals_ = [self._peer(p) for p in peers]
            if globals_ != list(peers):
                who += f" (global rank{'s' if len(peers) > 1 else ''} {', '.join(map(str, globals_))})"
            raise ZbError(f"{self.role} peer {who} failed while {what}: {e}. A rank died or is stuck; the step is "
                          f"abandoned (timeout {self.timeout.total_seconds():g} s, option 'timeout')") from e
