"""Time a schedule: each rank runs its actions in order, each as soon as its inputs are there.

An action waits for the rank to be free and for its dependencies (F after the previous stage's F, B after the
next stage's B and its own F, W after its B); a dependency on another rank adds one transfer (`costs.comm`).
The result has every action's start and end, the makespan, the bubble rate as the paper defines it (from the
span of the busiest rank, see `Timeline.bubble_rate`) and each rank's peak activation memory.

With data parallelism each stage's parameter gradients are all-reduced over its replicas (`costs.reduce`, the
REDUCE action of a lowered schedule). `reduction` says when:
- "overlap" (zb, REDUCE in the schedule): a stage's reduction starts when its last W (or BW) ends and the rank's
  network channel is free; a rank's reductions run one after another on that channel, while it computes on.
- "after" (data parallelism after the pipeline, as DDP does): a rank's reductions start after its last compute.
- "none": no reduction.
Compute is timed alike in all three, so makespan and bubble rate are the compute's; `step_time` also covers the
reductions and `exposed_reduction` is the difference. The reductions are taken from the compute actions (a stage's
last W or BW, where `lower(..., reduce=True)` puts REDUCE), so lowered and compute-only schedules time alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zb.schedules.actions import BW, COMPUTE, Action, B, F, Schedule, ScheduleError, W
from zb.schedules.costs import Costs

REDUCTIONS = ("overlap", "after", "none")


def dependencies(action: Action, num_stages: int, split: bool) -> list[Action]:
    """The compute actions that must finish before `action` (communication is not modelled as an action)."""
    s, kind, mb = action
    back = B if split else BW
    if kind == F:
        return [Action(s - 1, F, mb)] if s > 0 else []
    if kind in (B, BW):
        deps = [Action(s, F, mb)]
        if s < num_stages - 1:
            deps.append(Action(s + 1, back, mb))
        return deps
    if kind == W:
        return [Action(s, B, mb)]
    return []


@dataclass
class Timeline:
    """When each action of a schedule starts and ends under given costs, with the bubble and memory that follow."""
    schedule: Schedule
    costs: Costs
    start: dict[Action, float] = field(default_factory=dict)
    end: dict[Action, float] = field(default_factory=dict)
    reduce_start: dict[int, float] = field(default_factory=dict)  # stage -> start of its gradient reduction
    reduce_end: dict[int, float] = field(default_factory=dict)

    def rank_actions(self, rank: int) -> list[tuple[Action, float, float]]:
        return [(a, self.start[a], self.end[a]) for a in self.schedule.actions[rank] if a.kind in COMPUTE]

    def rank_reductions(self, rank: int) -> list[tuple[int, float, float]]:
        """(stage, start, end) of the gradient reductions of the stages on `rank`, in the order they start."""
        stages = [s for s in self.reduce_start if self.schedule.placement[s] == rank]
        return sorted(((s, self.reduce_start[s], self.reduce_end[s]) for s in stages), key=lambda r: (r[1], r[2]))

    @property
    def has_reduction(self) -> bool:
        """Whether any gradient reduction takes time (zero-cost reductions change nothing)."""
        return any(self.reduce_end[s] > self.reduce_start[s] for s in self.reduce_start)

    @property
    def makespan(self) -> float:
        """Compute only: from the first action's start to the last compute action's end."""
        return max(self.end.values()) - min(self.start.values())

    @property
    def step_time(self) -> float:
        """From the first action's start to the end of everything, gradient reductions included."""
        return max((*self.end.values(), *self.reduce_end.values())) - min(self.start.values())

    @property
    def exposed_reduction(self) -> float:
        """Reduction time that no compute hides: step_time - makespan."""
        return self.step_time - self.makespan

    def span(self, rank: int) -> float:
        acts = self.rank_actions(rank)
        return acts[-1][2] - acts[0][1] if acts else 0.0

    def work(self, rank: int) -> float:
        return sum(e - s for _, s, e in self.rank_actions(rank))

    @property
    def bubble_rate(self) -> float:
        """(cost - work) / cost: cost is the longest rank span (first start to last end), work that rank's busy
        time. With equal work on every rank this is the paper's (cost - m(T_F+T_B+T_W)) / cost."""
        ranks = range(self.schedule.num_ranks)
        cost = max(self.span(r) for r in ranks)
        longest = max(ranks, key=lambda r: (self.span(r), self.work(r)))
        return (cost - self.work(longest)) / cost if cost else 0.0

    @property
    def peak_memory(self) -> list[float]:
        return peak_memory(self.schedule, self.costs)

    def summary(self) -> dict:
        """makespan, bubble_rate, peak_memory; and step_time, exposed_reduction when reductions take time."""
        summary = {"makespan": self.makespan, "bubble_rate": self.bubble_rate, "peak_memory": self.peak_memory}
        if self.has_reduction:
            summary.update(step_time=self.step_time, exposed_reduction=self.exposed_reduction)
        return summary


def simulate(schedule: Schedule, costs: Costs, reduction: str = "overlap") -> Timeline:
    """Time a compute-only or lowered schedule; `reduction` is "overlap", "after" or "none" (module docstring)."""
    if reduction not in REDUCTIONS:
        raise ScheduleError(f"reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    lists, starts, end = _run(schedule, costs)
    timeline = Timeline(schedule, costs, end=end)
    for acts, times in zip(lists, starts):
        timeline.start.update(zip(acts, times))
    if reduction != "none":
        _time_reductions(timeline, lists, after=reduction == "after")
    return timeline


def span_key(schedule: Schedule, costs: Costs, cutoff: float | None = None) -> tuple[float, float] | None:
    """(longest rank span, makespan): what zb-auto minimises, timed as `simulate` does without building a
    Timeline (its dictionaries cost more than the timing). None, early, once some rank's span exceeds `cutoff`."""
    timed = _run(schedule, costs, cutoff)
    if timed is None:
        return None
    lists, starts, end = timed
    used = [(acts, times) for acts, times in zip(lists, starts) if acts]
    first = min(times[0] for _, times in used)
    last = max(end[acts[-1]] for acts, _ in used)
    return max(end[acts[-1]] - times[0] for acts, times in used), last - first


def peak_memory(schedule: Schedule, costs: Costs) -> list[float]:
    """Each rank's peak activation memory: it depends on the order alone, not on the times."""
    n = costs.num_stages
    delta = {kind: [costs.memory_delta(s, kind) for s in range(n)] for kind in COMPUTE}
    peaks = []
    for acts in schedule.actions:
        level = peak = 0.0
        for stage, kind, _ in acts:
            if kind in delta:
                level += delta[kind][stage]
                if level > peak:
                    peak = level
        peaks.append(peak)
    return peaks


def _run(schedule: Schedule, costs: Costs, cutoff: float | None = None):
    """Each rank's compute actions, their start times (in the same order) and every action's end time; None as
    soon as a rank's span so far exceeds `cutoff`."""
    if costs.num_stages != schedule.num_stages:
        raise ScheduleError(f"costs are for {costs.num_stages} stages, the schedule has {schedule.num_stages}")
    placement, last = schedule.placement, schedule.num_stages - 1
    back = B if schedule.split_backward else BW
    comm = costs.comm
    duration = {F: costs.f, B: costs.b, W: costs.w, BW: tuple(b + w for b, w in zip(costs.b, costs.w))}
    lists = [[a for a in acts if a.kind in COMPUTE] for acts in schedule.actions]
    starts: list[list[float]] = [[] for _ in lists]
    end: dict[Action, float] = {}
    free = [0.0] * len(lists)
    position = [0] * len(lists)
    remaining = sum(map(len, lists))
    # Each rank runs its list until an input is missing; the ranks take turns until all is done. Plain tuples
    # look up Action keys (an Action is a tuple), and the dependencies (see `dependencies`) are written out:
    # this loop is most of zb-auto's planning time.
    while remaining:
        progressed = False
        for rank, acts in enumerate(lists):
            i = begin = position[rank]
            t, times, count = free[rank], starts[rank], len(acts)
            while i < count:
                action = acts[i]
                s, kind, mb = action
                if kind == F:
                    if s:
                        ready = end.get((s - 1, F, mb))
                        if ready is None:
                            break
                        if placement[s - 1] != rank:
                            ready += comm
                        if ready > t:
                            t = ready
                elif kind == W:
                    if (s, B, mb) not in end:
                        break
                else:
                    if (s, F, mb) not in end:
                        break
                    if s < last:
                        ready = end.get((s + 1, back, mb))
                        if ready is None:
                            break
                        if placement[s + 1] != rank:
                            ready += comm
                        if ready > t:
                            t = ready
                times.append(t)
                t += duration[kind][s]
                end[action] = t
                i += 1
            if i != begin:
                remaining -= i - begin
                progressed = True
                position[rank], free[rank] = i, t
                if cutoff is not None and t - times[0] > cutoff:
                    return None
        if not progressed:
            blocked = [str(acts[position[r]]) for r, acts in enumerate(lists) if position[r] < len(acts)]
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks: every rank waits ({', '.join(blocked)})")
    return lists, starts, end


def _time_reductions(timeline: Timeline, lists: list[list[Action]], after: bool) -> None:
    """Each stage's reduction, on its rank's one network channel, in the order the stages' last W (or BW) run."""
    for acts in lists:
        last = {a.stage: a for a in acts if a.kind in (W, BW)}
        channel = 0.0  # when the rank's network channel is next free
        for a in acts:
            if last.get(a.stage) != a:
                continue
            ready = timeline.end[acts[-1]] if after else timeline.end[a]
            timeline.reduce_start[a.stage] = start = max(ready, channel)
            timeline.reduce_end[a.stage] = channel = start + timeline.costs.reduce[a.stage]
