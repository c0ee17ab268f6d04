"""Profiling a pipeline's steps: which steps are traced, and what the last traced step measured on every rank.

zb/adapt.py picks the steps (`steps`, and `repeat`: how often each piece of a step runs back to back, the quickest
run counting) and reads what they measured to re-plan or re-cut; option profile traces every step. The clock and
the arithmetic from a trace to costs and a timeline are runtime/profile.py's.
"""

from __future__ import annotations

from zb.codegen.program import Program
from zb.core.errors import ZbError
from zb.runtime.profile import measured_costs, measured_timeline
from zb.schedules import Schedule, Timeline


class StepProfiler:
    """Decides whether a step is traced and how often its pieces repeat, and keeps what the last traced step
    measured: every rank's action trace, the costs derived from it, the quickest run of each repeated piece."""

    def __init__(self, program: Program):
        self.program = program
        # The step numbers (counted from 1) whose actions are traced and gathered from every rank, and, per step
        # number, how often each piece runs back to back to measure it (set by zb/adapt.py before the step).
        self.steps: set[int] = set()
        self.repeat: dict[int, int] = {}
        self.trace: list[tuple[int, str, float, float]] = []  # every rank's actions in the last profiled step
        self.costs = None  # costs measured in the last profiled step
        self.quickest: dict = {}  # (stage, kind) -> quickest of repeated runs per action, in a measured step

    def plan(self, number: int) -> tuple[bool, int]:
        """(whether step `number` is traced, how often each of its pieces runs)."""
        training = self.program.training
        profiled = training and (self.program.options.profile or number in self.steps)
        return profiled, self.repeat.get(number, 1) if training else 1

    def collect(self, executor, comm) -> None:
        """After a traced step: every rank's trace and quickest runs (gathered over `comm` across processes), and
        the costs they measure."""
        trace, quickest = executor.trace, executor.quickest
        if comm.distributed:
            everyone = comm.all_gather_object((trace, quickest), "gathering every rank's step timings")
            trace = [record for records, _ in everyone for record in records]
            quickest = {key: times for _, theirs in everyone for key, times in theirs.items()}
        self.trace, self.quickest = trace, quickest
        self.costs = measured_costs(trace, self.program)

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

    def timeline(self, schedule: Schedule) -> Timeline:
        """The last profiled step as a Timeline (real start and end of every action on every rank)."""
        if not self.trace:
            raise ZbError("no step was profiled; compile with options={'profile': True}")
        return measured_timeline(self.trace, schedule, self.costs)
