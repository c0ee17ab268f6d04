"""Where the pipeline runs: the process group, the number of stages, this process's ranks, the schedule.

Without a process group (and outside torchrun) every stage runs in this process: `stages=1` is plain
single-process training; `stages > 1` runs all ranks' action lists here with in-memory channels, a mode for
debugging and testing that gives the same numbers as the distributed run. Under torchrun with no process group
yet, zb creates one: gloo on CPU; NCCL when CUDA is present, after `torch.cuda.set_device(LOCAL_RANK)` so that
each process drives its own GPU. Every check here runs identically on every rank, before any
communication, so a bad option fails everywhere at once.

With schedule zb-auto and no 'stages', the placement is decided here, before the model is cut: one stage per
rank, or two per rank in a V or interleaved (`zb.schedules.choose_placement`, so a V means 2p stages). Nothing is
measured yet, so the decision assumes what the paper's hand-made schedules do: every rank's stage costs the
same, F = B = W, no transfer time, one microbatch's activations M_B per stage (a limit given in bytes cannot be
checked before the stages exist: it takes effect when zb-auto re-plans with measured costs, on the same placement).
The decision and its reason are logged and shown in the plan summary.

Data parallelism (`data_parallel=D`, or a `mesh`): the W processes form a (dp, pp) DeviceMesh of D replicas of
a W/D-rank pipeline, built with `init_device_mesh(device, (D, W // D), mesh_dim_names=("dp", "pp"))`, so global
rank g is pipeline rank g % (W // D) of replica g // (W // D): ranks [0, P) are replica 0's pipeline, [P, 2P)
replica 1's, and pipeline rank r's replica group is {r, P + r, 2P + r, ...}. Without a process group, the D
replicas run one after another in this process, each on its part of the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os

from zb.core.errors import ZbOptionError
from zb.core.options import Options
from zb.runtime import DistributedComm, LocalComm, sequential_schedule
from zb.runtime.comm import Failures
from zb.schedules import Costs, Decision, Schedule, ScheduleError, choose_placement, default_chunks, generate

log = logging.getLogger(__name__)


class Pipeline:
    """Says where one compiled graph's pipeline runs: its stages, this process's ranks, their communication, the
    schedule."""

    def __init__(self, options: Options):
        self.options = options
        self.replicas = options.data_parallel
        self.distributed = _distributed(options)
        self.group, self.replica_group, self.replica = options.group, None, 0
        if self.distributed:
            self.group, self.replica_group, self.replica = _groups(options)
        world = _world_size(self.group) if self.distributed else 1
        self.rank = _rank(self.group) if self.distributed else 0
        self.chunks = default_chunks(options.schedule)
        self.decision = _decide_placement(options, world)
        if self.decision is not None:
            self.chunks = self.decision.chunks
        elif options.schedule == "zb-auto" and options.stages in (world, 2 * world) and world > 1:
            self.chunks = options.stages // world  # 2 x world stages: zb-auto picks the V or the interleaved placement
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
        self.failures = Failures.for_job() if self.distributed else None

    @contextlib.contextmanager
    def failing_together(self):
        """Around every call: refuse at once if any rank of the job failed before; if this call raises, record the
        error for every rank to see (runtime/comm.py `Failures`), so no peer waits for its timeout."""
        if self.failures is None:
            yield
            return
        self.failures.raise_if_failed("before this call")
        try:
            yield
        except BaseException as e:
            import torch.distributed as dist

            self.failures.announce(dist.get_rank(), e)
            raise

    @property
    def placement_summary(self) -> str:
        """zb-auto's placement decision in one line, for the plan summary ("" without one)."""
        d = self.decision
        return "" if d is None else f"zb-auto chose {d.chunks} stage(s) per rank ({d.placement}): {d.reason}"

    @property
    def local_ranks(self) -> list[int]:
        return [self.rank] if self.distributed else list(range(max(1, self.num_ranks)))

    @property
    def local_replicas(self) -> int:
        """How many replicas this process runs: all of them without a process group, else its own."""
        return 1 if self.distributed else self.replicas

    def comm(self):
        """The communication module for one runner: over the process group, or in this process."""
        if not self.distributed:
            return LocalComm()
        return DistributedComm(self.group, self.options.timeout, _comm_device(self.group), failures=self.failures)

    def replica_comm(self):
        """The communication module over this rank's replica group (None without replicas across processes)."""
        if self.replica_group is None:
            return None
        return DistributedComm(self.replica_group, self.options.timeout, _comm_device(self.replica_group), "replica",
                               self.failures)

    def agree(self, value, what: str) -> list:
        """`value` of every process of this pipeline and its replicas (just this one's without torch.distributed),
        for what every process must decide alike although each compiled only its own stages."""
        values = [value]
        for comm in (c for c in (self.comm(), self.replica_comm()) if c is not None and c.distributed):
            values = [v for gathered in comm.all_gather_object(values, what) for v in gathered]
        return values

    def schedule_for(self, training: bool, costs: Costs | None = None) -> Schedule:
        """The compute-only schedule (validated); raises ScheduleError as a ZbOptionError for a bad request."""
        if training in self._schedules and costs is None:
            return self._schedules[training]
        m = self.options.microbatches
        if self.num_stages == 1:
            schedule = sequential_schedule(m, training)
        elif self.decision is not None and costs is None:
            schedule = self.decision.schedule
        else:
            try:
                schedule = generate(self.options.schedule, self.num_stages, m, costs, self.options.memory_limit,
                                    self.chunks)
            except ScheduleError as e:
                raise ZbOptionError(f"cannot build a {self.options.schedule} pipeline: {e}") from None
        self._schedules[training] = schedule
        return schedule


def _decide_placement(options: Options, ranks: int) -> Decision | None:
    """zb-auto without 'stages' on several ranks: how to cut and place the model (module docstring)."""
    if options.schedule != "zb-auto" or options.stages is not None or ranks < 2:
        return None
    try:
        decision = choose_placement(ranks, options.microbatches, Costs.uniform(ranks), options.memory_limit)
    except ScheduleError as e:
        raise ZbOptionError(f"cannot build a zb-auto pipeline: {e}") from None
    log.info("zb: zb-auto places %d stage(s) per rank (%s): %s", decision.chunks, decision.placement,
             decision.reason)
    return decision


def _distributed(options: Options) -> bool:
    import torch.distributed as dist

    if options.group is not None:
        return True
    if not dist.is_available():
        return False
    if options.mesh is not None:
        return True
    if not dist.is_initialized() and _launched_by_torchrun() and ((options.stages or 0) != 1
                                                                   or options.data_parallel > 1):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.is_initialized() and (dist.get_world_size() > 1 or options.data_parallel > 1)


_MESHES: dict = {}  # (replicas, world size) -> the DeviceMesh zb built, shared by every compiled graph


def _groups(options: Options):
    """(pipeline group, replica group or None, this rank's replica index) from option 'mesh' or 'data_parallel'."""
    import torch.distributed as dist

    mesh = options.mesh
    if mesh is None and options.data_parallel > 1:
        if options.group is not None:
            raise ZbOptionError("option 'data_parallel' builds the pipeline and replica groups itself; to choose "
                                "them, pass a DeviceMesh with dimensions ('dp', 'pp') as option 'mesh' instead of "
                                "'group'")
        world, replicas = dist.get_world_size(), options.data_parallel
        if world % replicas:
            raise ZbOptionError(f"data_parallel={replicas} does not divide the world size {world}: each of the "
                                f"replicas needs the same number of pipeline ranks; use a world size that is a "
                                f"multiple of {replicas} or another 'data_parallel'")
        if (replicas, world) not in _MESHES:
            from torch.distributed.device_mesh import init_device_mesh

            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            _MESHES[(replicas, world)] = init_device_mesh(device, (replicas, world // replicas),
                                                          mesh_dim_names=("dp", "pp"))
        mesh = _MESHES[(replicas, world)]
    if mesh is None:
        return options.group, None, 0
    replicas = mesh["dp"].size()
    return mesh["pp"].get_group(), mesh["dp"].get_group() if replicas > 1 else None, mesh.get_local_rank("dp")


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
