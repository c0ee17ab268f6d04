"""How boundary tensors move between pipeline ranks: in memory (one process) or over torch.distributed.

A message is identified by a tag (direction, stage, microbatch); both sides know its tensors' shapes and dtypes
from the plan, so receive buffers are allocated up front and nothing but the data crosses the wire.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch

from zb.errors import ZbError


def tag_of(backward: bool, stage: int, microbatch: int) -> int:
    return (microbatch * 1024 + stage) * 2 + int(backward)


def control_tag(kind: int) -> int:
    """Tags of the optimizer's control messages: a stage number no pipeline reaches."""
    return tag_of(False, 1023, kind)


class InProcessTransport:
    """All ranks in one process: a send stores the tensors, a receive takes them."""

    def __init__(self):
        self.box: dict[int, list[torch.Tensor]] = {}

    def send(self, tag: int, tensors: Sequence[torch.Tensor], dst: int) -> None:
        self.box[tag] = list(tensors)

    def prepare(self, receives: Sequence[tuple[int, Sequence[tuple], int]]) -> None:
        pass  # messages are stored by the send itself

    def ready(self, tag: int) -> bool:
        return tag in self.box

    def recv(self, tag: int, specs: Sequence[tuple], src: int) -> list[torch.Tensor]:
        return self.box.pop(tag)

    def send_control(self, kind: int, tensor: torch.Tensor, dst: int) -> None:
        self.box[-1 - control_tag(kind)] = [tensor.clone()]

    def recv_control(self, kind: int, shape: tuple, dtype: torch.dtype, src: int) -> tuple[torch.Tensor, int]:
        tag = -1 - control_tag(kind)
        if tag not in self.box:
            raise ZbError(f"rank {src} sent no optimizer message {kind}; the ranks disagree on the step")
        return self.box.pop(tag)[0], tag

    def wait(self, work, what: str) -> None:
        pass  # in memory, a message is there as soon as it is sent

    def finish(self) -> None:
        if self.box:
            raise ZbError(f"{len(self.box)} messages were sent but never received; the schedule is inconsistent")


class DistributedTransport:
    """Point-to-point over a process group: isend for sends (waited at the end of the step), blocking receives
    with a timeout, so a dead peer is an error instead of a hang."""

    def __init__(self, group, timeout: float):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.timeout = datetime.timedelta(seconds=timeout)
        self.pending: list = []
        self.posted: dict[int, tuple[list[torch.Tensor], list, int]] = {}

    def _peer(self, rank: int) -> int:
        return self.dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def send(self, tag: int, tensors: Sequence[torch.Tensor], dst: int) -> None:
        for i, tensor in enumerate(tensors):
            work = self.dist.isend(tensor.contiguous(), self._peer(dst), group=self.group, tag=tag * 64 + i)
            self.pending.append((work, tensor))

    def ready(self, tag: int) -> bool:
        return True  # a receive blocks until the data arrives (or the timeout passes)

    def prepare(self, receives: Sequence[tuple[int, Sequence[tuple], int]]) -> None:
        """Post every receive of the step at its start, into preallocated buffers: data lands as soon as it is
        sent, so a transfer's latency stays off the critical path."""
        for tag, specs, src in receives:
            self.posted[tag] = self._post(tag, specs, src)

    def _post(self, tag: int, specs: Sequence[tuple], src: int):
        buffers = [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
        works = [self.dist.irecv(b, self._peer(src), group=self.group, tag=tag * 64 + i) for i, b in enumerate(buffers)]
        return buffers, works, src

    def recv(self, tag: int, specs: Sequence[tuple], src: int) -> list[torch.Tensor]:
        buffers, works, src = self.posted.pop(tag) if tag in self.posted else self._post(tag, specs, src)
        for work in works:
            self._wait(work, f"receiving from rank {src}")
        return buffers

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        for work, _ in pending:
            self._wait(work, "sending")

    def send_control(self, kind: int, tensor: torch.Tensor, dst: int):
        """A small message outside the schedule (the optimizer's norms); returns the work to wait for."""
        return self.dist.isend(tensor, self._peer(dst), group=self.group, tag=control_tag(kind) * 64), tensor

    def recv_control(self, kind: int, shape: tuple, dtype: torch.dtype, src: int):
        buffer = torch.empty(shape, dtype=dtype)
        return buffer, self.dist.irecv(buffer, self._peer(src), group=self.group, tag=control_tag(kind) * 64)

    def wait(self, work, what: str) -> None:
        self._wait(work[0] if isinstance(work, tuple) else work, what)

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise ZbError(f"pipeline peer failed while {what}: {e}. A rank died or is stuck; the step is "
                          f"abandoned (timeout {self.timeout.total_seconds():g} s, option 'timeout')") from e
