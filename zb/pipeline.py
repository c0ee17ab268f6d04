"""Where the pipeline runs: the process group, the number of stages, this process's ranks, the schedule.

Without a process group (and outside torchrun) every stage runs in this process: `stages=1` is plain
single-process training; `stages > 1` runs all ranks' action lists here with in-memory channels, a mode for
debugging and testing that gives the same numbers as the distributed run. Under torchrun with no process group
yet, zb creates one: gloo on CPU; NCCL when CUDA is present, after `torch.cuda.set_device(LOCAL_RANK)` so that
each process drives its own GPU. Every check here runs identically on every rank, before any
communication, so a bad option fails everywhere at once.
"""

from __future__ import annotations

import os

from zb.core.errors import ZbOptionError
from zb.core.options import Options
from zb.runtime import DistributedComm, LocalComm, sequential_schedule
from zb.schedules import Costs, Schedule, ScheduleError, default_chunks, generate


class Pipeline:
    def __init__(self, options: Options):
        self.options = options
        self.group = options.group
        self.distributed = _distributed(options)
        world = _world_size(self.group) if self.distributed else 1
        self.rank = _rank(self.group) if self.distributed else 0
        self.chunks = default_chunks(options.schedule)
        self.num_stages = options.stages if options.stages is not None else world * self.chunks
        if self.num_stages == 1:
            self.chunks = 1
        self.num_ranks = self.num_stages // self.chunks if self.num_stages % self.chunks == 0 else 0
        if self.distributed and self.num_ranks != world:
            raise ZbOptionError(
                f"stages={self.num_stages} with schedule {options.schedule!r} ({self.chunks} stage(s) per rank) "
                f"needs {self.num_stages / self.chunks:g} ranks, but the process group has {world}; set "
                f"'stages' to {world * self.chunks} or change the number of processes"
            )
        self._schedules: dict[bool, Schedule] = {}

    @property
    def local_ranks(self) -> list[int]:
        return [self.rank] if self.distributed else list(range(max(1, self.num_ranks)))

    def comm(self):
        """The communication module for one runner: over the process group, or in this process."""
        if not self.distributed:
            return LocalComm()
        return DistributedComm(self.group, self.options.timeout, _comm_device(self.group))

    def schedule_for(self, training: bool, costs: Costs | None = None) -> Schedule:
        """The compute-only schedule (validated); raises ScheduleError as a ZbOptionError for a bad request."""
        if training in self._schedules and costs is None:
            return self._schedules[training]
        m = self.options.microbatches
        if self.num_stages == 1:
            schedule = sequential_schedule(m, training)
        else:
            try:
                schedule = generate(self.options.schedule, self.num_stages, m, costs, self.options.memory_limit,
                                    self.chunks)
            except ScheduleError as e:
                raise ZbOptionError(f"cannot build a {self.options.schedule} pipeline: {e}") from None
        self._schedules[training] = schedule
        return schedule


def _distributed(options: Options) -> bool:
    import torch.distributed as dist

    if options.group is not None:
        return True
    if not dist.is_available():
        return False
    if not dist.is_initialized() and _launched_by_torchrun() and (options.stages or 0) != 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(group):
    """Where collective and control buffers live: the current CUDA device for NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _world_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)
