"""What a step really did: timing its actions, the memory the program implies, measured costs and timelines.

`ActionClock` times the actions of a traced step: wall-clock on CPU, CUDA events on a GPU (read once the step is
over, so timing does not serialise the device within the step). `modelled_costs` gives the simulator the program's
activation bytes (M_B: what F leaves for the backward; M_W: what B leaves for W) with unit times; `measured_costs`
replaces the times by the median measured F, B, W time of each stage and the shortest receive (a transfer whose
data was already on its way); `measured_timeline` turns the executor's trace into a `Timeline` that draws like a
simulated one.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from zb.codegen.program import Program
from zb.schedules import BW, COMPUTE, Action, B, Costs, F, Schedule, Timeline, W


class ActionClock:
    """Start and end of each action of a traced step. On CPU `time.perf_counter`; on a CUDA device a pair of
    events per action, turned into seconds (from the step's first event) when the step's records are read."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.on = False
        self.marks: list = []

    def begin(self, on: bool) -> None:
        self.on, self.marks = on, []

    def start(self):
        if not self.on:
            return None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start, rank: int, action: Action) -> None:
        if start is not None:
            self.marks.append((rank, str(action), start, self.start()))

    def records(self) -> list[tuple[int, str, float, float]]:
        """(rank, action, start s, end s) of every action of the step."""
        if not self.cuda or not self.marks:
            return list(self.marks)
        torch.cuda.synchronize()
        origin = self.marks[0][2]
        return [(rank, text, origin.elapsed_time(a) / 1e3, origin.elapsed_time(b) / 1e3)
                for rank, text, a, b in self.marks]

    def now(self) -> float:
        """Seconds, after the device finished its queued work (for timing one piece on its own)."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def timed_runs(piece, args: list, repeat: int, clock: ActionClock, written: Sequence[int] = ()
               ) -> tuple[tuple, float]:
    """The results of the first run and the quickest of `repeat` runs' seconds; later runs replay the random
    state the first one started from, and the state after the first run is restored. `written`: positions of
    arguments the piece adds into (the step's gradient sums, codegen/accumulate.py): later runs add into copies,
    so that the step's sums get each gradient once."""
    before = torch.random.get_rng_state()
    start = clock.now()
    results = piece(list(args))
    quickest = clock.now() - start
    after = torch.random.get_rng_state()
    for _ in range(repeat - 1):
        torch.random.set_rng_state(before)
        again = list(args)
        for i in written:
            again[i] = again[i].clone()
        start = clock.now()
        piece(again)
        quickest = min(quickest, clock.now() - start)
    torch.random.set_rng_state(after)
    return results, quickest


def modelled_costs(program: Program, comm: float = 0.0) -> Costs:
    program.refresh_memory()  # (a symbolic plan: the bytes at the last call's sizes)
    n = program.num_stages
    return Costs((1.0,) * n, (1.0,) * n, (1.0,) * n, comm, tuple(s.memory_b for s in program.stages),
                 tuple(s.memory_w for s in program.stages))


def measured_costs(trace, program: Program, statistic=statistics.median) -> Costs:
    """F, B, W seconds per stage (the median over microbatches, or `statistic`) from (rank, action, start, end)
    records of all ranks."""
    program.refresh_memory()
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    receives = []
    for _, text, start, end in trace:
        action = Action.parse(text)
        if action.kind in COMPUTE:
            times[(action.stage, action.kind)].append(end - start)
        elif action.kind.startswith("RECV"):
            receives.append(end - start)
    n = program.num_stages

    def median(stage: int, kind: str) -> float:
        values = times.get((stage, kind))
        if values:
            return statistic(values)
        if kind in (B, W) and times.get((stage, BW)):  # unsplit backward measured: split it 2:1 as the paper does
            return statistic(times[(stage, BW)]) * (2 / 3 if kind == B else 1 / 3)
        return 1e-6

    return Costs(tuple(median(s, F) for s in range(n)), tuple(median(s, B) for s in range(n)),
                 tuple(median(s, W) for s in range(n)), min(receives) if receives else 0.0,
                 tuple(s.memory_b for s in program.stages), tuple(s.memory_w for s in program.stages))


def measured_timeline(trace, schedule: Schedule, costs: Costs) -> Timeline:
    """The compute actions of a trace as a Timeline (times from the first action of the step)."""
    origin = min(start for _, _, start, _ in trace)
    timeline = Timeline(schedule, costs)
    for _, text, start, end in trace:
        action = Action.parse(text)
        if action.kind in COMPUTE:
            timeline.start[action] = start - origin
            timeline.end[action] = end - origin
    return timeline
